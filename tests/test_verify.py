"""rpack extract, list, inspect and verify on the command line; hostile archives through run."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zstandard
from archives import (
    HOST_PLATFORM,
    Member,
    Raw,
    archive,
    directory,
    encode,
    entries,
    file,
    file_entry,
    hardlink,
    info,
    manifest,
    manifest_member,
    pax_header,
    pax_records,
    raw_header,
    snapshot,
    symlink,
    tar,
    zst,
)
from conftest import RPACK, archive_members, needs_root, rpack, rpack_env

from rpack.cli import main
from unpacker import UnpackError, verify
from unpacker.format import MANIFEST_PATH

ANY = "any member"  # the member a refusal names is not fixed (corrupt compressed data)
PROG = os.urandom(300_000)
MiB = 1 << 20


# --- running the command line ----------------------------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The one error line, checked to be the whole of stderr, without its prefix."""
        lines = self.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("rpack: error: "), self.err
        return lines[0].removeprefix("rpack: error: ")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., Result]]:
    """`rpack ARGS` run in this process (the same main as the console script), stdout and stderr
    captured; the logging set-up main makes is undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def call(*args: str | Path) -> Result:
        code = main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    yield call
    root.handlers[:] = handlers
    root.setLevel(level)


def peak_rss(*args: str | Path) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `rpack ARGS` in a fresh interpreter; return it and its peak RSS in bytes."""
    # VmHWM, not ru_maxrss: on Linux the latter survives execve, so it would start at ours.
    script = ("import re, sys\nfrom rpack.cli import main\ncode = main(sys.argv[1:])\n"
              "status = open('/proc/self/status').read()\n"
              "print(re.search(r'VmHWM:\\s+(\\d+) kB', status)[1], file=sys.stderr)\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=rpack_env(),
                          capture_output=True, text=True, timeout=300)
    *stderr, rss = done.stderr.splitlines()
    done.stderr = "\n".join(stderr) + "\n" if stderr else ""
    return done, int(rss) * 1024


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Throwaway 'host' files that hostile archives aim at."""
    host = tmp_path / "host"
    (host / "victimdir").mkdir(parents=True)
    (host / "victim").write_bytes(b"original")
    (host / "victimdir" / "keep").write_bytes(b"keep")
    return host


# --- the catalogue of security.md section 5: refusals ----------------------------------------


def valid() -> bytes:
    return archive(directory("usr"), directory("usr/bin"), file("usr/bin/prog", PROG, 0o755),
                   symlink("bin", "usr/bin"))


def flipped(data: bytes, offset: int, bit: int = 0x10) -> bytes:
    copy = bytearray(data)
    copy[offset] ^= bit
    return bytes(copy)


def without_checksum(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=False).compress(raw)


def device(name: str, kind: bytes) -> Member:
    ti = info(name, kind, mode=0o666)
    ti.devmajor, ti.devminor = (1, 3) if kind == tarfile.CHRTYPE else (8, 0)
    return ti, b""


def zeros_member(name: str, size: int) -> bytes:
    """A compressed archive of one file of `size` zero bytes, streamed: never all in memory."""
    sink = io.BytesIO()
    head = manifest_member(manifest([{"path": name, "type": "file", "mode": 0o644, "size": size,
                                      "sha256": "0" * 64}]))
    with zstandard.ZstdCompressor(level=1, write_checksum=True).stream_writer(
            sink, closefd=False) as writer:
        writer.write(head + raw_header(name.encode(), b"0", size))
        for _ in range(size // MiB):
            writer.write(bytes(MiB))
        writer.write(bytes(1024))
    return sink.getvalue()


def checksum_mismatch(_: Path) -> bytes:
    members = [file("usr/bin/prog", PROG, 0o755)]
    listed = entries(members)
    listed[0]["sha256"] = hashlib.sha256(b"another program").hexdigest()
    return archive(*members, head=manifest_member(manifest(listed)))


def unlisted(_: Path) -> bytes:
    members = [file("a", b"a"), file("x", b"x")]
    return archive(*members, head=manifest_member(manifest(entries(members[:1]))))


def cut_tar(_: Path) -> bytes:
    members = [file("a", b"a"), file("b", b"b"), file("c", b"c")]
    return archive(members[0], head=manifest_member(manifest(entries(members))))


def foreign(_: Path) -> bytes:
    members = [file("a", b"a")]
    platform = {**HOST_PLATFORM, "machine": "aarch64"}
    return archive(*members, head=manifest_member(manifest(entries(members), platform=platform)))


@dataclass
class Case:
    """One hostile archive: what `build(host)` makes is refused, naming `member`, per `match`."""

    id: str
    build: Callable[[Path], bytes]
    member: str | None
    match: str
    options: list[str] = field(default_factory=list)


CASES = [
    # A. Stream / zstd
    Case("A1-cut-half", lambda h: valid()[: len(valid()) // 2], None,
         r"truncated archive \(zstd frame incomplete\)"),
    Case("A2-cut-checksum", lambda h: valid()[:-4], None,
         r"truncated archive \(zstd frame incomplete\)"),
    Case("A3-bit-flip", lambda h: flipped(valid(), len(valid()) // 2), ANY,
         r"^(corrupt archive \(|checksum mismatch)"),
    Case("A4-no-checksum", lambda h: without_checksum(tar(file("a"))), None,
         r"zstd frame has no content checksum"),
    Case("A8-plain-tar", lambda h: tar(file("a")), None, r"^not a zstd archive$"),
    Case("A8-gzip", lambda h: b"\x1f\x8b\x08\x00" + bytes(100), None, r"^not a zstd archive$"),
    Case("A9-empty", lambda h: b"", None, r"^empty archive$"),
    Case("A10-size-cap", lambda h: zeros_member("bomb", 2 * MiB), "bomb",
         r"total size exceeds the size limit of 1048576 bytes \(--max-total-size\)",
         ["--max-total-size", "1M"]),
    # B. Tar structure and headers
    Case("B11-tar-cut", cut_tar, None,
         r"^manifest lists 2 entries not present in the archive \(the first is 'b'\)$"),
    Case("B12-after-end", lambda h: zst(tar(file("a")) + tar(file("hidden"), head=b"")), None,
         r"^data after end of archive$"),
    Case("B14-size-beyond-data",
         lambda h: archive(Raw(raw_header(b"big", b"0", 10_000) + bytes(512),
                               file_entry("big", bytes(10_000))), end=b""),
         "big", r"truncated archive \(member data cut short\)"),
    Case("B16-pax-1gb", lambda h: archive(raw_header(b"././@PaxHeader", b"x", 1 << 30)),
         "././@PaxHeader", r"pax header of 1073741824 bytes exceeds 65536"),
    Case("B18-pax-global",
         lambda h: archive(pax_header(pax_records(path="../host/victim"), b"g", b"pax_global"),
                           file("a")),
         "pax_global", r"global pax header refused"),
    Case("B19-header-checksum",
         lambda h: archive(raw_header(b"a", b"0")[:148] + b"0000000\0" + bytes(356)), None,
         r"corrupt archive \(invalid tar header at offset"),
    *[Case(f"B20-type-{flag}", lambda h, flag=flag: archive(raw_header(b"t", flag.encode())),
           "t", rf"unknown type '{flag}'") for flag in "ZVMDN"],
    Case("B21-gnu-sparse", lambda h: archive(raw_header(b"s", b"S")), "s",
         r"sparse member refused"),
    # C. Names and paths
    Case("C27-absolute", lambda h: archive(file(str(h / "victim"), b"pwned")), "{host}/victim",
         r"absolute name refused"),
    *[Case(f"C28-dotdot-{i}", lambda h, name=name: archive(file(name, b"pwned")), name,
           r"'\.\.' component refused")
      for i, name in enumerate(["../host/victim", "a/../../host/victim", "a/.."])],
    Case("C30-empty-name", lambda h: archive(file("", b"x")), "",
         r"empty or '\.' name refused for a non-directory"),
    Case("C30-dot-name", lambda h: archive(file(".", b"x")), ".",
         r"empty or '\.' name refused for a non-directory"),
    Case("C32-not-utf8", lambda h: archive(file("caf\udce9", b"x")), "caf\udce9",
         r"name is not valid utf-8"),
    # C4, D. Links, duplicates, ordering
    Case("C4-hardlink-outside", lambda h: archive(hardlink("h", str(h / "victim")), file("h")),
         "h", r"hardlink target '.*/victim': absolute name refused"),
    Case("C4-hardlink-through-symlink",
         lambda h: archive(symlink("l", str(h)), hardlink("h", "l/victim")), "h",
         r"hardlink target 'l/victim' is not an earlier regular file"),
    Case("D38-through-symlink",
         lambda h: archive(symlink("l", str(h / "victimdir")), file("l/pwn", b"pwned")),
         "l/pwn", r"would be created through symlink 'l'"),
    Case("D39-through-inner-symlink",
         lambda h: archive(directory("usr/lib"), symlink("lib", "usr/lib"),
                           file("lib/libc.so.6")),
         "lib/libc.so.6", r"would be created through symlink 'lib'"),
    Case("D41-file-over-symlink",
         lambda h: archive(symlink("f", str(h / "victim")), file("f", b"pwned")), "f",
         r"duplicate member refused \(already a symlink\)"),
    Case("D43-file-over-hardlink",
         lambda h: archive(file("f"), hardlink("h", "f"), file("h", b"pwned")), "h",
         r"duplicate member refused \(already a file\)"),
    Case("D45-dir-over-symlink", lambda h: archive(symlink("d", str(h)), directory("d")), "d/",
         r"duplicate member refused \(already a symlink\)"),
    # E. Special files
    Case("E53-char-device", lambda h: archive(device("dev/null", tarfile.CHRTYPE)), "dev/null",
         r"special file \(character device\) refused"),
    Case("E53-block-device", lambda h: archive(device("dev/sda", tarfile.BLKTYPE)), "dev/sda",
         r"special file \(block device\) refused"),
    Case("E54-fifo", lambda h: archive(device("fifo", tarfile.FIFOTYPE)), "fifo",
         r"special file \(fifo\) refused"),
    # H. Integrity
    Case("H81-no-manifest", lambda h: zst(bytes(10240)), None, r"^archive has no manifest$"),
    Case("H81-manifest-not-first", lambda h: archive(head=encode(file("etc/passwd", b"x"))),
         "etc/passwd", r"first member must be '\.rpack/manifest\.json'"),
    Case("H83-checksum", checksum_mismatch, "usr/bin/prog", r"^checksum mismatch \(sha256 "),
    Case("H84-unexpected", unlisted, "x", r"^unexpected member \(not in the manifest\)$"),
    Case("H86-manifest-too-large",
         lambda h: zst(raw_header(MANIFEST_PATH.encode(), b"0", (16 << 20) + 1)), MANIFEST_PATH,
         r"manifest larger than 16777216 bytes"),
    Case("H86-manifest-not-json",
         lambda h: archive(head=encode(file(MANIFEST_PATH, b"{not json"))), MANIFEST_PATH,
         r"^invalid manifest \(expecting property name"),
    Case("C22-manifest-escape", lambda h: archive(head=manifest_member(manifest(
        generator="rpack\x1b]0;retitled\x07\x1b[2J"))), MANIFEST_PATH,
         r"^invalid manifest \(control character or lone surrogate in a string of 'generator'\)$"),
    Case("C22-manifest-c1", lambda h: archive(head=manifest_member(manifest(
        env={"X": "\x9b31m"}))), MANIFEST_PATH,
         r"^invalid manifest \(control character or lone surrogate in a string of 'env'\)$"),
    Case("C22-manifest-surrogate", lambda h: archive(head=manifest_member(manifest(
        generator="rpack \ud800"))), MANIFEST_PATH,
         r"^invalid manifest \(control character or lone surrogate in a string of 'generator'\)$"),
    Case("C22-origin-escape", lambda h: archive(
        file("a", b"x"), head=manifest_member(manifest(
            [{**file_entry("a", b"x"), "origin": "x\x1b]0;retitled\x07"}]))), MANIFEST_PATH,
         r"^invalid manifest \(control character or lone surrogate in a string of 'entries'\)$"),
    Case("H86-entrypoint-nul", lambda h: archive(head=manifest_member(manifest(
        entrypoint=["/bin/sh\x00-c"]))), MANIFEST_PATH,
         r"^invalid manifest \(control character or lone surrogate in a string of 'entrypoint'\)$"),
    Case("H86-long-number", lambda h: archive(head=encode(file(
        MANIFEST_PATH, b'{"format": "rpack/1", "n": ' + b"9" * 5001 + b"}"))), MANIFEST_PATH,
         r"^invalid manifest \(exceeds the limit \(4300 digits\) for integer string "
         r"conversion: value has 5001 digits\)$"),
    Case("H86-env-a-list", lambda h: archive(head=manifest_member(manifest(env=["A=1"]))),
         MANIFEST_PATH, r"^invalid manifest \('env' is not an object of strings\)$"),
    Case("H86-env-name-with-equals", lambda h: archive(head=manifest_member(manifest(
        env={"A=B": "1"}))), MANIFEST_PATH,
         r"^invalid manifest \('env' has a name that is empty or holds '='\)$"),
    Case("H86-entrypoint-empty", lambda h: archive(head=manifest_member(manifest(
        entrypoint=[]))), MANIFEST_PATH,
         r"^invalid manifest \('entrypoint' is not a non-empty list of strings\)$"),
    Case("H86-workdir-relative", lambda h: archive(head=manifest_member(manifest(
        workdir="tmp"))), MANIFEST_PATH,
         r"^invalid manifest \('workdir' is not an absolute path\)$"),
    # Section 4 of the issue: the platform
    Case("platform", foreign, None, r"^archive is for aarch64 \(64-bit, little-endian\), this "
         r"host is \S+ \(\d\d-bit, \w+-endian\)$"),
]


def check_error(error: str, case: Case, host: Path, archive: Path) -> None:
    """The refusal names the case's member (quoted as the error does), or the archive for a
    fault of the whole, and its reason."""
    member = case.member.format(host=host) if case.member else case.member
    if member == ANY:
        reason = re.sub(r"^member '[^']*': ", "", error.removeprefix(f"{archive}: "))
    elif member is None:
        assert error.startswith(f"{archive}: "), error
        reason = error.removeprefix(f"{archive}: ")
    else:
        prefix = f"member {member!r}: "
        assert error.startswith(prefix), error
        reason = error.removeprefix(prefix)
    assert re.search(case.match, reason), error


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_refused_by_extract_and_verify(cli: Callable[..., Result], case: Case, host: Path,
                                       tmp_path: Path) -> None:
    hostile = tmp_path / "hostile.tar.zst"
    hostile.write_bytes(case.build(host))
    empty = tmp_path / "empty"
    empty.mkdir()
    before = snapshot(tmp_path, empty)  # I1: everything but the destination, host/ included

    for dest in (tmp_path / "new", empty):
        done = cli("extract", *case.options, hostile, dest)
        assert done.code == 1 and done.out == "", done
        check_error(done.error, case, host, hostile)
        assert snapshot(tmp_path, empty) == before  # a new dest is gone again
        assert os.listdir(empty) == []

    done = cli("verify", *case.options, hostile)
    assert done.code == 1 and done.out == "", done
    check_error(done.error, case, host, hostile)
    assert snapshot(tmp_path, tmp_path / "-") == snapshot(tmp_path, tmp_path / "-")
    assert snapshot(tmp_path, empty) == before and os.listdir(empty) == []


# A representative subset through `rpack run`, as root: 125, and I1 to I3.
RUN_CASES = ["A1-cut-half", "A4-no-checksum", "B12-after-end", "B18-pax-global", "C27-absolute",
             "C28-dotdot-0", "C4-hardlink-outside", "D38-through-symlink",
             "D41-file-over-symlink", "E53-char-device", "H81-no-manifest", "H83-checksum",
             "H84-unexpected", "platform"]


def mountinfo() -> list[str]:
    return sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())


@needs_root
@pytest.mark.parametrize("case", [case for case in CASES if case.id in RUN_CASES],
                         ids=RUN_CASES)
def test_refused_by_run(case: Case, host: Path, tmp_path: Path) -> None:
    hostile = tmp_path / "hostile.tar.zst"
    hostile.write_bytes(case.build(host))
    base = tmp_path / "base"
    base.mkdir()
    before, mounts = snapshot(tmp_path, base), mountinfo()

    done = rpack("run", "--tmpdir", base, *case.options, hostile, "-c", "echo ran")
    assert done.returncode == 125, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rpack: error: "), done.stderr
    check_error(lines[0].removeprefix("rpack: error: "), case, host, hostile)
    assert snapshot(tmp_path, base) == before  # I1
    # I2: no root, and nothing in the cache but its empty skeleton.
    left = [*base.glob("rpack-*/*"), *base.glob("rpack-*/cache/*"), *base.glob("rpack-*/cache/*/*")]
    assert {str(path.relative_to(base)) for path in left} <= {
        f"rpack-{os.getuid()}/cache", f"rpack-{os.getuid()}/cache/keys"}, left
    assert mountinfo() == mounts  # I3


# --- the catalogue: allowed and neutralised --------------------------------------------------

def owned(member: Member, uid: int, gid: int) -> Member:
    member[0].uid, member[0].gid = uid, gid
    return member


ALLOWED: list[Member] = [
    directory("./"),  # B26
    symlink("bin", "usr/bin"),  # D37: a realistic root
    directory("d"), directory("d", 0o750),  # D47: the last mode wins
    file("empty", b"", 0o000),  # E51
    file("Lib/x", b"x"), file("lib/y", b"y"),  # C35, and C36: parents made implicitly
    symlink("lib64/ld.so", "/lib/x86_64-linux-gnu/ld.so"),
    symlink("loop-a", "loop-b"), symlink("loop-b", "loop-a"),
    file("mtime-nan", pax={"mtime": "nan"}), file("mtime-huge", pax={"mtime": "1e400"}),  # B23
    owned(file("owned", b"o"), 1234, 4321),  # E52
    directory("tmp", 0o1777),  # E49
    symlink("up", "../../../../etc"),
    directory("usr"), directory("usr/bin"),
    file("usr/bin/prog", PROG, 0o4755), hardlink("usr/bin/prog2", "usr/bin/prog"),  # E48
]


def allowed_archive(frames: int = 1) -> bytes:
    raw = tar(*ALLOWED)
    if frames == 1:
        return zst(raw)
    step = len(raw) // frames + 1
    return b"".join(zst(raw[start : start + step]) for start in range(0, len(raw), step))


def modes(root: Path) -> dict[str, Any]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "f"
            value = os.readlink(path) if kind == "l" else stat.S_IMODE(st.st_mode)
            found[str(path.relative_to(root))] = (kind, value, st.st_uid, st.st_gid)
    return found


def test_allowed_and_neutralised(cli: Callable[..., Result], tmp_path: Path) -> None:
    one, two = tmp_path / "one.tar.zst", tmp_path / "two.tar.zst"
    one.write_bytes(allowed_archive())
    two.write_bytes(allowed_archive(frames=3))  # A6: several frames, the same result
    assert cli("verify", one).code == 0 and cli("verify", two).code == 0

    assert cli("extract", one, tmp_path / "a").code == 0
    assert cli("extract", two, tmp_path / "b").code == 0
    found = modes(tmp_path / "a")
    assert found == modes(tmp_path / "b")
    me = (os.geteuid(), os.getegid())
    expected = {
        "bin": ("l", "usr/bin"), "d": ("d", 0o750), "empty": ("f", 0o600),
        "Lib": ("d", 0o755), "Lib/x": ("f", 0o644), "lib": ("d", 0o755), "lib/y": ("f", 0o644),
        "lib64": ("d", 0o755), "lib64/ld.so": ("l", "/lib/x86_64-linux-gnu/ld.so"),
        "loop-a": ("l", "loop-b"), "loop-b": ("l", "loop-a"), "mtime-nan": ("f", 0o644),
        "mtime-huge": ("f", 0o644), "owned": ("f", 0o644), "tmp": ("d", 0o1777),
        "up": ("l", "../../../../etc"), "usr": ("d", 0o755), "usr/bin": ("d", 0o755),
        "usr/bin/prog": ("f", 0o755), "usr/bin/prog2": ("f", 0o755),
        ".rpack": ("d", 0o755), MANIFEST_PATH: ("f", 0o644),
    }
    assert {path: value[:2] for path, value in found.items()} == expected
    assert {value[2:] for value in found.values()} == {me}
    prog = (tmp_path / "a/usr/bin/prog").stat()
    assert prog.st_nlink == 2 and (tmp_path / "a/usr/bin/prog").read_bytes() == PROG

    assert cli("extract", "--trust-setuid", one, tmp_path / "c").code == 0
    assert stat.S_IMODE((tmp_path / "c/usr/bin/prog").stat().st_mode) == 0o4755


@needs_root
def test_numeric_owner(cli: Callable[..., Result], tmp_path: Path) -> None:
    archive_path = tmp_path / "a.tar.zst"
    archive_path.write_bytes(allowed_archive())
    assert cli("extract", "--numeric-owner", archive_path, tmp_path / "a").code == 0
    owned = (tmp_path / "a/owned").stat()
    assert (owned.st_uid, owned.st_gid) == (1234, 4321)
    assert (tmp_path / "a/usr").stat().st_uid == 0


# --- extract, list, inspect, verify on a real archive ----------------------------------------


@pytest.fixture(scope="module")
def sh_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sh") / "sh.tar.zst"
    done = rpack("create", out, "/bin/sh")
    assert done.returncode == 0, done.stderr
    return out


def stored_manifest(archive_path: Path) -> dict[str, Any]:
    with open(archive_path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as stream:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            first = tf.next()
            assert first is not None and first.name == MANIFEST_PATH
            data = tf.extractfile(first)
            assert data is not None
            result: dict[str, Any] = json.loads(data.read())
            return result


def test_verify_passes_a_valid_archive(sh_archive: Path) -> None:
    done = rpack("verify", sh_archive)
    assert done.returncode == 0, done.stderr
    count = len(archive_members(sh_archive))
    assert re.fullmatch(rf".*: ok, {count} members, identity sha256:[0-9a-f]{{64}}\n",
                        done.stdout)
    assert rpack("-q", "verify", sh_archive).stdout == ""


def test_list_json_agrees_with_the_manifest(sh_archive: Path) -> None:
    done = rpack("list", "--json", sh_archive)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    stored = stored_manifest(sh_archive)
    assert listed[0]["path"] == MANIFEST_PATH
    keys = ("path", "type", "mode", "size", "sha256", "target", "origin")
    assert [{k: m[k] for k in keys if k in m} for m in listed[1:]] == stored["entries"]
    assert {(m["uid"], m["gid"]) for m in listed} == {(0, 0)}


def test_list_is_tar_tv(sh_archive: Path) -> None:
    done = rpack("list", sh_archive)
    assert done.returncode == 0, done.stderr
    tar_tv = subprocess.run(f"zstd -dc {sh_archive} | tar -tv", shell=True, capture_output=True,
                            text=True, check=True, env=rpack_env())
    assert done.stdout == tar_tv.stdout


def test_inspect_json_agrees_with_the_manifest(sh_archive: Path) -> None:
    done = rpack("inspect", "--json", sh_archive)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    stored = stored_manifest(sh_archive)
    for key in ("format", "generator", "platform", "entrypoint", "programs", "env", "workdir",
                "totals"):
        assert summary[key] == stored[key], key
    assert summary["members"] == len(stored["entries"]) + 1 == len(archive_members(sh_archive))
    assert summary["file_bytes"] == stored["totals"]["bytes"]
    assert summary["compressed_bytes"] == sh_archive.stat().st_size
    identity = subprocess.run(f"zstd -dc {sh_archive} | sha256sum", shell=True,
                              capture_output=True, text=True, check=True).stdout.split()[0]
    assert summary["identity"] == f"sha256:{identity}"
    with open(sh_archive, "rb") as f:
        assert summary["tar_bytes"] == len(zstandard.ZstdDecompressor().stream_reader(f).read())


def test_inspect_shows_the_identity(sh_archive: Path) -> None:
    done = rpack("inspect", sh_archive)
    assert done.returncode == 0, done.stderr
    identity = subprocess.run(f"zstd -dc {sh_archive} | sha256sum", shell=True,
                              capture_output=True, text=True, check=True).stdout.split()[0]
    fields = dict(line.split(":", 1) for line in done.stdout.splitlines())
    assert fields["identity"].strip() == f"sha256:{identity}"
    assert fields["entrypoint"].strip() == "/bin/sh"
    assert fields["min kernel"].strip() == stored_manifest(sh_archive)["platform"]["min_kernel"]
    assert fields["members"].strip().startswith(f"{len(archive_members(sh_archive))} ")


def test_inspect_and_list_a_foreign_archive(cli: Callable[..., Result], tmp_path: Path) -> None:
    path = tmp_path / "arm.tar.zst"
    path.write_bytes(foreign(tmp_path))
    assert json.loads(cli("inspect", "--json", path).out)["platform"]["machine"] == "aarch64"
    assert cli("list", path).code == 0
    assert cli("verify", path).code == 1
    assert cli("verify", "--any-platform", path).code == 0


@pytest.mark.parametrize("cut", [1, 4, 5, 100, 1000, 100_000, 500_000, -100_000, -1000, -9, -4,
                                 -1])
def test_verify_fails_a_truncated_copy(cli: Callable[..., Result], sh_archive: Path,
                                       tmp_path: Path, cut: int) -> None:
    data = sh_archive.read_bytes()
    copy = tmp_path / "cut.tar.zst"
    copy.write_bytes(data[:cut])
    done = cli("verify", copy)
    assert done.code == 1 and re.search(r"truncated archive|empty archive", done.error), done


def test_verify_fails_a_copy_truncated_anywhere(tmp_path: Path) -> None:
    # Every cut point of a small archive, through the library verify uses.
    data = archive(directory("d"), file("d/a", os.urandom(3000)), file("d/b", b"b" * 5000),
                   symlink("s", "d/a"), hardlink("h", "d/b"))
    verify(io.BytesIO(data))
    for cut in range(len(data)):
        with pytest.raises(UnpackError, match=r"^(truncated archive|empty archive)"):
            verify(io.BytesIO(data[:cut]))


@pytest.mark.parametrize("where", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0])
def test_verify_fails_a_copy_with_a_flipped_bit(cli: Callable[..., Result], sh_archive: Path,
                                                tmp_path: Path, where: float) -> None:
    data = sh_archive.read_bytes()
    offset = min(int(len(data) * where), len(data) - 1)
    for bit in (0x01, 0x80):
        copy = tmp_path / "flipped.tar.zst"
        copy.write_bytes(flipped(data, offset, bit))
        done = cli("verify", copy)
        if done.code == 0:  # one of zstd's rare redundant bits: the very same tar
            assert done.out.split()[-1] == cli("verify", sh_archive).out.split()[-1]
            continue
        assert done.code == 1 and done.error, (offset, bit, done)


def test_every_flipped_bit_is_refused_or_harmless(tmp_path: Path) -> None:
    """Every bit of a small archive flipped in turn, through the library verify uses.

    zstd's checksum covers the decoded bytes, and the sha256 in the manifest each file's: a flip
    that changes any decoded byte is refused. A few bits of zstd's entropy-coded blocks are
    redundant (about 1 in 1500 in an archive of /bin/sh): flipped, they decode to the very same
    tar, so the archive's identity, and all it extracts to, are unchanged.
    """
    data = archive(directory("d"), file("d/a", os.urandom(300)), file("d/b", b"b" * 500),
                   symlink("s", "d/a"))
    identity = verify(io.BytesIO(data)).identity
    harmless = 0
    for offset in range(len(data)):
        for bit in (1, 2, 4, 8, 16, 32, 64, 128):
            try:
                summary = verify(io.BytesIO(flipped(data, offset, bit)))
            except UnpackError:
                continue
            assert summary.identity == identity, (offset, bit)
            harmless += 1
    assert harmless < len(data) * 8 // 50


@pytest.mark.parametrize(
    "trailer",
    [b"\0", b"x", b"\0" * 4, b"garbage!" * 100,
     (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"skip",
     b"\x28\xb5\x2f\xfd"],
    ids=["zero", "byte", "zeros", "garbage", "skippable-frame", "frame-magic"],
)
def test_verify_fails_a_copy_with_trailing_bytes(cli: Callable[..., Result], sh_archive: Path,
                                                 tmp_path: Path, trailer: bytes) -> None:
    copy = tmp_path / "trailing.tar.zst"
    copy.write_bytes(sh_archive.read_bytes() + trailer)
    done = cli("verify", copy)
    assert done.code == 1
    assert re.search(r"data after end of archive|skippable|truncated", done.error), done


def test_verify_fails_a_second_archive_appended(cli: Callable[..., Result], sh_archive: Path,
                                                tmp_path: Path) -> None:
    copy = tmp_path / "twice.tar.zst"
    copy.write_bytes(sh_archive.read_bytes() * 2)
    assert cli("verify", copy).error == f"{copy}: data after end of archive"


def test_extract_then_chroot_like_tar(sh_archive: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    done = rpack("extract", sh_archive, dest)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    by_tar = tmp_path / "tar"
    by_tar.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", sh_archive, "-C", by_tar], check=True)
    # The same tree, but that rpack keeps owner rwx on directories (proc is 0555 in the archive).
    expected = {path: (kind, value | 0o700 if kind == "d" else value, *owner)
                for path, (kind, value, *owner) in modes(by_tar).items()}
    assert modes(dest) == expected
    for path, (kind, *_) in expected.items():
        if kind == "f":
            assert (dest / path).read_bytes() == (by_tar / path).read_bytes()
    if os.geteuid() == 0:
        ran = subprocess.run(["chroot", dest, "/bin/sh", "-c", "echo hello from the root"],
                             capture_output=True, text=True)
        assert ran.stdout == "hello from the root\n", ran.stderr


def test_extract_destination(cli: Callable[..., Result], sh_archive: Path,
                             tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine").write_bytes(b"mine")
    assert cli("extract", sh_archive, full).error == f"destination {str(full)!r} is not empty"
    assert os.listdir(full) == ["mine"]
    missing = tmp_path / "no" / "such"
    assert cli("extract", sh_archive, missing).error == (
        f"cannot create destination {str(missing)!r}: no such file or directory")
    nothing = tmp_path / "nothing"
    assert cli("verify", nothing).error == (
        f"cannot open {str(nothing)!r}: no such file or directory")


def test_standard_input(sh_archive: Path) -> None:
    with open(sh_archive, "rb") as f:
        done = subprocess.run([*RPACK, "inspect", "--json", "-"], stdin=f, capture_output=True,
                              text=True, env=rpack_env())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["members"] == len(archive_members(sh_archive))
    # A fault of the whole archive names it: here, standard input.
    done = subprocess.run([*RPACK, "verify", "-"], input=sh_archive.read_bytes()[:1000],
                          capture_output=True, env=rpack_env())
    assert (done.returncode, done.stderr) == (
        1, b"rpack: error: standard input: truncated archive (zstd frame incomplete)\n")


def test_list_fails_part_way(cli: Callable[..., Result], sh_archive: Path,
                             tmp_path: Path) -> None:
    copy = tmp_path / "cut.tar.zst"
    copy.write_bytes(sh_archive.read_bytes()[:-100_000])
    done = cli("list", copy)
    assert done.code == 1 and done.error.startswith(f"{copy}: truncated archive")
    assert ".rpack/manifest.json" in done.out.splitlines()[0]
    json_done = cli("list", "--json", copy)
    assert json_done.code == 1 and json_done.out == ""


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--max-total-size", "12X", "expected a size such as 512M or 2G, got '12X'"),
     ("--max-members", "0", "expected a positive number, got '0'"),
     ("--max-depth", "-3", "expected a positive number, got '-3'")],
)
def test_limit_options_checked(option: str, value: str, message: str) -> None:
    done = rpack("verify", f"{option}={value}", "x.tar.zst")
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.parametrize(
    ("options", "members", "match"),
    [
        (["--max-members", "3"], [file("a"), file("b"), file("c")],
         r"member 'c': too many members \(limit 3, --max-members\)"),
        (["--max-member-size", "1K"], [file("a", bytes(1025))],
         r"member 'a': size 1025 exceeds the size limit of 1024 bytes \(--max-member-size\)"),
        (["--max-depth", "2"], [file("a/b/c")], r"depth 3 exceeds the limit of 2 \(--max-depth\)"),
    ],
)
def test_limit_options(cli: Callable[..., Result], tmp_path: Path, options: list[str],
                       members: list[Member], match: str) -> None:
    path = tmp_path / "a.tar.zst"
    path.write_bytes(archive(*members))
    for command in ("verify", "list", "inspect"):
        assert re.search(match, cli(command, *options, path).error)
    assert cli("verify", path).code == 0  # the defaults fit


# --- memory ----------------------------------------------------------------------------------


def test_size_bomb_refused_before_writing(tmp_path: Path) -> None:
    # Case A10 as the catalogue spells it: 2 GiB of zeros (64 kB compressed), a 1 GiB cap.
    bomb = tmp_path / "bomb.tar.zst"
    bomb.write_bytes(zeros_member("bomb", 2 << 30))
    done, rss = peak_rss("extract", "--max-total-size", "1G", bomb, tmp_path / "dest")
    assert done.returncode == 1
    assert "member 'bomb': total size exceeds the size limit" in done.stderr
    assert not (tmp_path / "dest").exists()
    assert rss < 200 * MiB


def test_huge_pax_header_uses_no_memory(tmp_path: Path) -> None:
    # Case B16: a pax header that claims 1 GB is refused before anything is read.
    path = tmp_path / "pax.tar.zst"
    path.write_bytes(archive(raw_header(b"././@PaxHeader", b"x", 10**9) + bytes(1 << 20)))
    done, rss = peak_rss("verify", path)
    assert "pax header of 1000000000 bytes exceeds" in done.stderr
    assert rss < 100 * MiB


def test_a_manifest_of_many_small_values_is_refused_unparsed(tmp_path: Path) -> None:
    # 4 MiB of "{}, " under an unknown key: parsed, some 100 MiB of dicts; counted, refused.
    padded = manifest(zpad=[{}] * 1_100_000)
    path = tmp_path / "padded.tar.zst"
    path.write_bytes(archive(head=manifest_member(padded)))
    done, rss = peak_rss("verify", path)
    assert re.fullmatch(rf"rpack: error: member {re.escape(repr(MANIFEST_PATH))}: invalid "
                        r"manifest \(22000\d\d json items, more than 200000 entries need; "
                        r"see --max-members\)\n", done.stderr), done.stderr
    assert rss < 100 * MiB
    # The bound follows the option: the same manifest with fewer entries allowed.
    small = tmp_path / "small.tar.zst"
    small.write_bytes(archive(head=manifest_member(manifest(zpad=[{}] * 3000))))
    refused = peak_rss("verify", "--max-members", "100", small)[0]
    assert "json items, more than 100 entries need" in refused.stderr
    assert peak_rss("verify", small)[0].returncode == 0


def test_too_many_members(tmp_path: Path) -> None:
    # Case B25: 150 000 empty members against a cap of 100 000; memory stays bounded.
    count = 150_000
    listed = [{"path": f"d{i:06}", "type": "dir", "mode": 0o755} for i in range(count)]
    body = b"".join(raw_header(b"d%06d/" % i, b"5", mode=0o755) for i in range(count))
    path = tmp_path / "many.tar.zst"
    path.write_bytes(zst(manifest_member(manifest(listed)) + body + bytes(1024)))
    done, rss = peak_rss("verify", "--max-members", "100000", path)
    # The manifest is member 1: member 100 001 is d099999.
    assert done.stderr == ("rpack: error: member 'd099999/': too many members "
                           "(limit 100000, --max-members)\n")
    assert rss < 200 * MiB
