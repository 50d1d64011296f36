"""Every dynamically linked program in /usr/bin and /usr/sbin: `rpack deps` against the loader.

For each program the real loader's trace (LD_TRACE_LOADED_OBJECTS=1, executed directly) gives
the objects it maps and the names it cannot find; `rpack deps --json --allow-missing` must give
the same library and interpreter paths and the same missing names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Trace, clean_env, loaded_paths, loader_trace
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

pytestmark = pytest.mark.heavy

PROGRAM_DIRS = ("/usr/bin", "/usr/sbin")
WORKERS = max(1, min(4, os.cpu_count() or 1))

# Calls rpack in-process for one program per input line (a Python start-up per program would
# take minutes) and answers each with one JSON line.
WORKER = """
import contextlib, io, json, sys
from rpack.cli import main

for line in sys.stdin:
    program = line.rstrip("\\n")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(["deps", "--json", "--allow-missing", program])
        except SystemExit as exit:
            rc = exit.code if isinstance(exit.code, int) else 1
        except Exception as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            rc = -1
    print(json.dumps({"program": program, "rc": rc, "stdout": out.getvalue(),
                      "stderr": err.getvalue()}), flush=True)
"""


def interpreter(path: str) -> str | None:
    """The PT_INTERP string of an ELF executable; None for anything else."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return None
            f.seek(0)
            for segment in ELFFile(f).iter_segments(type="PT_INTERP"):
                return str(segment.get_interp_name())
    except (OSError, ELFError):
        pass
    return None


def dynamic_programs() -> dict[str, str]:
    """Dynamically linked executables and their PT_INTERP, each file once (symlinks and
    hard links collapse to the real path)."""
    seen: set[tuple[int, int]] = set()
    programs = {}
    for directory in PROGRAM_DIRS:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            real = os.path.realpath(entry.path)
            try:
                st = os.stat(real)
            except OSError:
                continue  # a dangling symlink
            if (st.st_dev, st.st_ino) in seen or not os.path.isfile(real):
                continue
            seen.add((st.st_dev, st.st_ino))
            if os.access(real, os.X_OK) and (interp := interpreter(real)):
                programs[real] = interp
    return programs


def rpack_deps_many(programs: list[str], cwd: Path) -> dict[str, dict]:
    """`rpack deps --json --allow-missing` of each program, in a few in-process workers."""
    chunks = [programs[i::WORKERS] for i in range(WORKERS)]
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER], cwd=cwd, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=clean_env({"PYTHONPATH": str(REPO)}))
        for _ in chunks
    ]
    answers = {}
    for worker, chunk in zip(workers, chunks, strict=True):
        out, err = worker.communicate("".join(f"{p}\n" for p in chunk), timeout=600)
        assert worker.returncode == 0, f"rpack worker failed:\n{err}"
        for line in out.splitlines():
            answer = json.loads(line)
            answers[answer["program"]] = answer
    return answers


def difference(program: str, interp: str, trace: Trace, answer: dict) -> str | None:
    if answer["rc"] != 0:
        return f"{program}: rpack deps exited {answer['rc']}: {answer['stderr'].strip()}"
    deps = json.loads(answer["stdout"])
    paths = loaded_paths(deps)
    # The trace leaves the loader out when no object needs it by name; it is mapped anyway.
    expected = trace.paths | {interp}
    missing = {m["name"] for m in deps["missing"]}
    if paths == expected and missing == set(trace.missing):
        return None
    parts = [f"{program}:"]
    if expected - paths:
        parts.append(f"only the loader maps {sorted(expected - paths)}")
    if paths - expected:
        parts.append(f"only rpack maps {sorted(paths - expected)}")
    if missing != set(trace.missing):
        parts.append(f"missing: loader {sorted(trace.missing)}, rpack {sorted(missing)}")
    return " ".join(parts)


def test_host_programs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    programs = dynamic_programs()
    assert programs, f"no dynamically linked program in {PROGRAM_DIRS}"

    traces: dict[str, Trace] = {}
    untraceable = []
    for program in programs:
        try:
            trace = loader_trace(program, cwd=tmp_path)
        except (OSError, subprocess.TimeoutExpired) as exc:
            untraceable.append(f"{program} ({exc})")
            continue
        if trace.rc == 5 and not trace.stdout:
            untraceable.append(f"{program} (setuid or setgid: the loader will not trace it)")
        elif trace.rc != 0 or not trace.paths:
            untraceable.append(f"{program} (rc {trace.rc}: {trace.stderr.strip()[:120]})")
        else:
            traces[program] = trace

    answers = rpack_deps_many(list(traces), tmp_path)
    differences = [d for p, t in traces.items()
                   if (d := difference(p, programs[p], t, answers[p]))]

    with capsys.disabled():
        print(f"\nhost programs: {len(programs)} dynamically linked, {len(traces)} compared, "
              f"{len(untraceable)} skipped (the loader could not trace them), "
              f"{len(differences)} differ")
        for line in untraceable:
            print(f"  skipped: {line}")
    assert not differences, "\n".join(differences)
