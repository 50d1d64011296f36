"""Mutated archives: refused or extracted; no traceback, no write outside, memory bounded."""

from __future__ import annotations

import io
import json
import os
import re
import resource
import traceback
from pathlib import Path
from typing import Any

from archives import (
    directory,
    file,
    hardlink,
    snapshot,
    symlink,
    tar,
    with_checksum,
    zst,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unpacker import UnpackError, extract, list_members, verify
from unpacker.dirfd import clear_directory

EXAMPLES = 3000
MEMORY_HEADROOM = 1 << 30  # address space the child may add: the 128 MiB zstd window fits
RSS_GROWTH_MAX = 256 << 20

# (offset, length) of the ustar header fields a mutation may rewrite.
FIELDS = {"name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8),
          "size": (124, 12), "mtime": (136, 12), "chksum": (148, 8), "typeflag": (156, 1),
          "linkname": (157, 100), "magic": (257, 6), "version": (263, 2), "prefix": (345, 155)}
# Names and types lead deepest into the checks: they are drawn more often.
FIELD_DRAWS = ["name"] * 4 + ["linkname", "typeflag", "size", "mode"] * 2 + sorted(FIELDS)
NAMES = [b"..", b"/", b"../", b"a/../../x", b"/etc/passwd", b"l/pwn", b"bin/x", b"abs",
         b"usr/bin", b"usr/bin/prog", b"usr/bin/prog2", b"usr/bin/prog/x", b".", b"./", b"",
         b"a\nb", b"\xff\xfe", b"tmp", b"tmp/", b"x" * 100]
TYPEFLAGS = b"0123456712LKgxXSVMDNZ\0 "


def base_members(host: Path) -> list[Any]:
    """A small root with every member type, pax records, and links that aim at `host`."""
    return [
        directory("usr"), directory("usr/bin"),
        file("usr/bin/prog", bytes(range(256)) * 8, 0o4755),
        hardlink("usr/bin/prog2", "usr/bin/prog"),
        symlink("bin", "usr/bin"),
        symlink("abs", str(host / "victim")),
        symlink("l", str(host / "victimdir")),
        file("lx/pwn", b"one byte from 'l/pwn'"),
        file("usr/share/" + "long-name-" * 12, b"pax path", pax={"mtime": "1234.5"}),
        directory("tmp", 0o1777),
        file("empty", b"", 0o000),
    ]


def header_offsets(raw: bytes) -> list[int]:
    """Where each header block of a tar stream starts, pax headers included."""
    offsets, pos = [], 0
    while pos + 512 <= len(raw) and raw[pos : pos + 512] != bytes(512):
        offsets.append(pos)
        size = int(raw[pos + 124 : pos + 136].split(b"\0")[0].strip() or b"0", 8)
        pos += 512 + -(-size // 512) * 512
    return offsets


@st.composite
def field_value(draw: st.DrawFn, length: int) -> bytes:
    """Bytes for a header field: noise, an octal number, base-256, a name, or a type."""
    if length == 1:
        return bytes([draw(st.sampled_from(TYPEFLAGS) | st.integers(0, 255))])
    kind = draw(st.sampled_from(["bytes", "octal", "base256", "text", "text"]))
    if kind == "bytes":
        value = draw(st.binary(min_size=0, max_size=length))
    elif kind == "octal":
        number = draw(st.integers(min_value=0, max_value=8 ** (length - 1) - 1) | st.integers())
        value = b"%o" % abs(number)
    elif kind == "base256":
        value = bytes([draw(st.sampled_from([0x80, 0xFF]))]) + draw(
            st.binary(min_size=length - 1, max_size=length - 1))
    else:
        value = draw(st.sampled_from(NAMES))
    return value[:length].ljust(length, b"\0")


@st.composite
def mutated(draw: st.DrawFn, raw: bytes, compressed: bytes) -> bytes:
    """A valid archive changed one way or another."""
    how = draw(st.sampled_from(["flip", "cut", "trail", "tar-bytes"] + ["header"] * 4))
    if how == "flip":
        data = bytearray(compressed)
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if how == "cut":
        return compressed[: draw(st.integers(0, len(compressed) - 1))]
    if how == "trail":
        return compressed + draw(st.binary(min_size=1, max_size=64))

    data = bytearray(raw)
    if how == "header":
        for _ in range(draw(st.integers(1, 2))):
            start = draw(st.sampled_from(header_offsets(raw)))
            offset, length = FIELDS[draw(st.sampled_from(FIELD_DRAWS))]
            data[start + offset : start + offset + length] = draw(field_value(length))
            if draw(st.integers(0, 4)):  # mostly past the checksum, deeper into the checks
                data[start : start + 512] = with_checksum(data[start : start + 512])
    else:
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return zst(bytes(data))


def fuzz(work: Path) -> dict[str, Any]:
    """Run the examples in this process; return what the parent checks."""
    host = work / "host"
    (host / "victimdir").mkdir(parents=True)
    (host / "victim").write_bytes(b"original")
    (host / "victimdir" / "keep").write_bytes(b"keep")
    dests = work / "dests"
    dests.mkdir()
    raw = tar(*base_members(host))
    compressed = zst(raw)
    (dests / "check").mkdir()
    extract(io.BytesIO(compressed), dests / "check")  # the base archive is valid
    outside = snapshot(work, dests)
    counts = {"extracted": 0, "refused": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(mutated(raw, compressed))
    def examples(data: bytes) -> None:
        dest = dests / "dest"
        dest.mkdir()
        try:
            outcome = extract_outcome(data, dest)
            # extract reads from memory, verify from a file: with and without read-ahead.
            assert outcome == verify_outcome(data, dests / "archive.tar.zst"), \
                "verify and extract disagree"
            list_outcome(data)
            assert snapshot(work, dests) == outside, "something outside dest changed"
        finally:
            fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
            try:
                clear_directory(fd)
            finally:
                os.close(fd)
            dest.rmdir()
        counts["extracted" if outcome is None else "refused"] += 1

    examples()
    return counts


def checked(exc: UnpackError) -> str:
    # What rpack did not foresee reaches the user as an internal error (a traceback with --debug).
    assert "internal error" not in exc.reason, str(exc)
    assert "out of memory" not in exc.reason, str(exc)
    return str(exc)


def extract_outcome(data: bytes, dest: Path) -> str | None:
    try:
        extract(io.BytesIO(data), dest)
    except UnpackError as exc:
        assert os.listdir(dest) == [], "a refused extraction left files"
        return checked(exc)
    return None


def verify_outcome(data: bytes, path: Path) -> str | None:
    """verify of `data` written to the file `path`: a regular file is decompressed ahead in a
    thread of its own, which must refuse exactly what reading in one thread refuses."""
    path.write_bytes(data)
    try:
        with open(path, "rb") as source:
            verify(source)
    except UnpackError as exc:
        return checked(exc)
    return None


def list_outcome(data: bytes) -> None:
    try:
        for listed in list_members(io.BytesIO(data)):
            listed.as_json()
    except UnpackError as exc:
        checked(exc)


def memory_kb(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB$", status, re.MULTILINE)
    assert match is not None
    return int(match[1])


def test_mutated_archives(tmp_path: Path) -> None:
    """Thousands of mutations of a valid archive, in a child with a cap on its address space.

    Each one is refused with UnpackError (and an empty destination) or extracted; verify comes
    to the same verdict and list raises nothing else; nothing outside the destination changes.
    The child's peak RSS may grow by RSS_GROWTH_MAX at most over the whole run.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        report: dict[str, Any]
        try:
            os.close(read_fd)
            limit = memory_kb("VmSize") * 1024 + MEMORY_HEADROOM
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            baseline = memory_kb("VmRSS")
            counts = fuzz(tmp_path)
            report = {"counts": counts, "growth": (memory_kb("VmHWM") - baseline) * 1024}
        except BaseException:
            report = {"error": traceback.format_exc()}
        finally:
            with os.fdopen(write_fd, "w") as pipe:
                json.dump(report, pipe)
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        report = json.loads(pipe.read() or '{"error": "the child died without a word"}')
    os.waitpid(pid, 0)

    assert "error" not in report, report["error"]
    assert report["growth"] < RSS_GROWTH_MAX, report
    counts = report["counts"]
    assert counts["extracted"] + counts["refused"] >= EXAMPLES * 0.9, counts
    assert counts["refused"] > counts["extracted"] > 0, counts
