"""Progress bars: shown on a terminal while long work runs and erased after; never in a pipe
or with -q."""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import struct
import subprocess
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RPACK, needs_root, rpack, rpack_env

# The bars show at once with TQDM_DELAY=0 (tqdm's own override of rpack's half second), so
# no test depends on how fast the machine is; enough data for several updates.
DATA_MIB = 128
SHOW_AT_ONCE = {"TQDM_DELAY": "0"}

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    where = tmp_path_factory.mktemp("progress")
    data = where / "data"
    data.mkdir()
    for index in range(DATA_MIB // 32):
        (data / f"part{index}").write_bytes(os.urandom(32 << 20))
    archive = where / "big.tar.zst"
    done = rpack("create", "-q", archive, "--add", data, "/bin/sh")
    assert done.returncode == 0, done.stderr
    yield where


def on_terminal(*args: str | Path) -> tuple[int, str]:
    """Run rpack with standard output and error on a 120x30 terminal; its status and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen([*RPACK, *map(str, args)], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env=rpack_env(SHOW_AT_ONCE))
    os.close(slave)
    output = bytearray()
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError as e:
                if e.errno != errno.EIO:  # EIO: every writer has closed the terminal
                    raise
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
    return proc.wait(timeout=300), output.decode(errors="replace")


def erased(output: str) -> bool:
    """Whether the last thing the terminal shows of a bar is a blank line."""
    return output.endswith("\r") and output.rstrip("\r").split("\r")[-1].strip() == ""


@pytest.mark.parametrize(("command", "label"), [
    ("create", "packing: "), ("extract", "unpacking: "), ("verify", "verifying: "),
    ("export-oci", "reading archive: ")])
def test_long_work_shows_a_bar_on_a_terminal_and_erases_it(big: Path, command: str,
                                                           label: str) -> None:
    args: list[str | Path] = {
        "create": ["create", "-f", big / "again.tar.zst", "--add", big / "data", "/bin/sh"],
        "extract": ["extract", big / "big.tar.zst", big / "extracted"],
        "verify": ["verify", big / "big.tar.zst"],
        "export-oci": ["export-oci", "-f", big / "big.tar.zst", big / "image.tar"],
    }[command]
    status, output = on_terminal(*args)
    assert status == 0, output
    assert label in output and "%|" in output and "B/s" in output
    if command == "verify":
        output = output[:output.rindex(f"{big / 'big.tar.zst'}: ok")]
    assert erased(output), output[-300:]


@pytest.mark.parametrize("command", ["create", "extract", "export-oci"])
def test_no_bar_with_quiet_or_off_a_terminal(big: Path, tmp_path: Path, command: str) -> None:
    def args(out: str) -> list[str | Path]:
        if command == "create":
            return ["create", tmp_path / out, "--add", big / "data", "/bin/sh"]
        if command == "export-oci":
            return ["export-oci", big / "big.tar.zst", tmp_path / out]
        return ["extract", big / "big.tar.zst", tmp_path / out]

    assert on_terminal("-q", *args("quiet")) == (0, "")
    piped = rpack(*args("piped"), env=SHOW_AT_ONCE)
    assert (piped.returncode, piped.stderr) == (0, "")


@needs_root
def test_run_erases_its_bar_before_the_program_writes(big: Path) -> None:
    status, output = on_terminal("run", "--no-cache", big / "big.tar.zst", "-c", "echo hello")
    assert status == 0, output
    assert "unpacking: " in output and "%|" in output
    before, hello, after = output.rpartition("hello")
    assert hello and after.strip() == "" and erased(before), output[-300:]
