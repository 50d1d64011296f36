"""rpack run end to end: real programs of this host, packed and run in their own root."""

from __future__ import annotations

import os
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from conftest import RPACK, rpack, rpack_env

pytestmark = pytest.mark.root


def mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f)


@pytest.fixture(scope="module")
def sh_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sh") / "sh.tar.zst"
    assert rpack("create", str(out), "/bin/sh", "/bin/sleep").returncode == 0
    return out


def test_run_passes_output_and_status_and_leaves_nothing(sh_archive: Path,
                                                          tmp_path: Path) -> None:
    before = mounts()
    done = rpack("run", "--tmpdir", str(tmp_path), str(sh_archive), "-c", "echo ok; exit 3")
    assert done.stdout == "ok\n", done.stderr
    assert done.returncode == 3
    assert mounts() == before
    assert [list(base.iterdir()) for base in tmp_path.iterdir()] == [[]]


@pytest.mark.parametrize(("script", "status"), [
    ("exit 0", 0), ("exit 7", 7), ("kill -TERM $$", 143), ("kill -INT $$", 130),
    ("exec /etc/ld.so.cache", 126), ("exec /no/such/program", 127),
])
def test_exit_status_passes_through(sh_archive: Path, script: str, status: int) -> None:
    assert rpack("run", str(sh_archive), "-c", script).returncode == status


def test_entrypoint_missing_from_root_is_127(sh_archive: Path) -> None:
    done = rpack("run", "--entrypoint", "/usr/bin/nothere", str(sh_archive))
    assert done.returncode == 127
    assert "/usr/bin/nothere" in done.stderr


def test_shipping_through_a_pipe() -> None:
    env = rpack_env()
    rpack_command = " ".join(RPACK)
    command = f"{rpack_command} create - /bin/sh | {rpack_command} run - -c 'echo piped'"
    done = subprocess.run(command, shell=True, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "piped\n"


def test_sigterm_to_rpack_ends_the_program_and_cleans_up(sh_archive: Path,
                                                         tmp_path: Path) -> None:
    before = mounts()
    env = rpack_env()
    process = subprocess.Popen([*RPACK, "run", "--tmpdir", str(tmp_path),
                                str(sh_archive), "-c", "echo started; sleep 60"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert process.stdout is not None
    assert process.stdout.readline() == b"started\n"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 143
    assert mounts() == before
    assert [list(base.iterdir()) for base in tmp_path.iterdir()] == [[]]


def test_refused_archive_runs_nothing(tmp_path: Path) -> None:
    hostile = tmp_path / "hostile.tar.zst"
    victim = tmp_path / "victim"
    with open(hostile, "wb") as f:
        with zstandard.ZstdCompressor(write_checksum=True).stream_writer(f) as z:
            with tarfile.open(fileobj=z, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo(str(victim))
                tar.addfile(info)
    (tmp_path / "base").mkdir()
    done = rpack("run", "--tmpdir", str(tmp_path / "base"), str(hostile))
    assert done.returncode == 125
    assert done.stderr.startswith("rpack: error: ")
    assert not victim.exists()
    assert [list(base.iterdir()) for base in (tmp_path / "base").iterdir()] == [[]]


PROGRAMS = [
    (["/bin/bash"], [], ["-c", "echo $((6 * 7))"], "42"),
    (["/bin/ls"], [], ["-la", "/"], "lib64 -> usr/lib64"),
    (["/usr/bin/git"], [], ["--version"], "git version"),
    # gdb embeds Python, which aborts at start-up without its standard library.
    (["/usr/bin/gdb"], ["--add", "/usr/lib/python3.11"], ["--version"], "GNU gdb"),
    (["/usr/bin/cmake"], [], ["--version"], "cmake version"),
    (["/usr/bin/perl"], [], ["-e", "print 1"], "1"),
    (["/usr/bin/python3"], ["--add", "/usr/lib/python3.11"],
     ["-c", "import json; print(json.dumps({'ok': 1}))"], '{"ok": 1}'),
]


@pytest.mark.heavy
@pytest.mark.parametrize(("programs", "options", "args", "expected"), PROGRAMS,
                         ids=[os.path.basename(p[0][0]) for p in PROGRAMS])
def test_real_programs_run_in_their_root(programs: list[str], options: list[str],
                                         args: list[str], expected: str,
                                         tmp_path: Path) -> None:
    out = tmp_path / "prog.tar.zst"
    created = rpack("create", *options, str(out), *programs)
    assert created.returncode == 0, created.stderr
    done = rpack("run", str(out), *args)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
