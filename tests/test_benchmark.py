"""The benchmark script runs every case end to end (its figures are read, never asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, needs_root, rpack_env

CASES = ["create gdb", "create 8 large programs", "extract gdb.tar.zst",
         "extract large.tar.zst", "run sh -c true, --no-cache", "run sh -c true, cached root",
         "run gdb --version, --no-cache", "run gdb --version, cached root",
         "run gdb: second run vs first (cache)", "programs in /usr/bin (one call)",
         "programs, one call each", "create 64 MiB (memory)", "extract 64 MiB (memory)",
         "run 64 MiB, --no-cache (memory)"]


@pytest.mark.heavy
@needs_root
def test_the_benchmark_runs_every_case() -> None:
    done = subprocess.run([sys.executable, str(REPO / "tests" / "benchmark.py"), "--runs", "1",
                           "--memory-mib", "64"], capture_output=True, text=True,
                          env=rpack_env(), timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = done.stdout.splitlines()
    for case in CASES:
        row = next((row for row in rows if case in row), None)
        assert row is not None, f"no row for {case!r}:\n{done.stdout}"
        # Two times in seconds, a ratio and a peak RSS: every column filled.
        assert row.count(" s ") == 2 and row.split()[-1].replace(".", "").isdigit(), row
