"""Tests of unpacker.extract on real archives built here, valid and hostile."""

import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from archives import (
    HOST_PLATFORM,
    MTIME,
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
    pad,
    pax_header,
    pax_records,
    raw_header,
    snapshot,
    symlink,
    tar,
    zst,
)

from unpacker import Limits, UnpackError, extract, verify
from unpacker.dirfd import clear_directory
from unpacker.format import FORMAT, MANIFEST_PATH

NOBODY = 65534
LD_SO = "/lib/x86_64-linux-gnu/ld.so"
root_only = pytest.mark.skipif(os.getuid() != 0, reason="needs root (uid 65534, chown, mount)")


# --- checking results ------------------------------------------------------------------------


def tree(root: Path) -> dict[str, tuple[str, int, Any]]:
    """The extracted tree: per relative path its type, permission bits and content or target."""
    found: dict[str, tuple[str, int, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("symlink", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
            else:
                found[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return found


def refuse(data: bytes, dest: Path, member: str | None, match: str,
           limits: Limits | None = None) -> UnpackError:
    """Extract `data`, expecting a refusal that names `member`, and no trace left anywhere.

    `verify` must refuse it with the same message, writing nothing at all.
    """
    before = snapshot(dest.parent, dest)
    with pytest.raises(UnpackError) as caught:
        extract(io.BytesIO(data), dest, limits=limits)
    error = caught.value
    message = str(error)
    everything = snapshot(dest.parent, dest.parent / "-")
    with pytest.raises(UnpackError) as verified:
        verify(io.BytesIO(data), limits=limits)
    assert str(verified.value) == message
    assert snapshot(dest.parent, dest.parent / "-") == everything
    assert error.member == member, message
    if error.member is not None:
        assert message.startswith(f"member {error.member!r}: "), message
    assert re.search(match, message), message
    # One line; lowercase apart from quoted names.
    assert "\n" not in message, message
    unquoted = re.sub(r"'[^']*'", "", error.reason)
    assert unquoted == unquoted.lower(), message
    assert os.listdir(dest) == [], "partial extraction left behind"
    assert snapshot(dest.parent, dest) == before, "something outside dest changed"
    return error


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Throwaway 'host' files that hostile archives aim at."""
    host = tmp_path / "host"
    (host / "victimdir").mkdir(parents=True)
    (host / "victim").write_bytes(b"original")
    (host / "victimdir" / "keep").write_bytes(b"keep")
    return host


@pytest.fixture
def dest(tmp_path: Path, host: Path) -> Path:
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    return dest


# --- a valid root filesystem -----------------------------------------------------------------

BIG = os.urandom(3 << 20)

ROOTFS: list[Member] = [
    directory("./"),
    symlink("bin", "usr/bin"),
    directory("dev"),
    directory("etc"),
    file("etc/ld.so.cache", b"cache"),
    file("lib/x86_64-linux-gnu/libc.so.6", b"\x7fELF libc", 0o755),
    directory("lib64"),
    symlink("lib64/ld.so", LD_SO),
    symlink("loop-a", "loop-b"),
    symlink("loop-b", "loop-a"),
    directory("proc", 0o555),
    directory("tmp", 0o1777),
    symlink("up", "../../../../etc"),
    directory("usr", 0o755),
    directory("usr", 0o750),
    directory("usr/bin"),
    file("usr/bin/busybox", b"\x7fELF busybox", 0o4755),
    hardlink("usr/bin/ls", "usr/bin/busybox"),
    file("usr/bin/dash", b"\x7fELF dash", 0o755),
    symlink("usr/bin/sh", "dash"),
    file("usr/share/big", BIG),
    file("usr/share/caf\u00e9", b"non-ascii name"),
    file("usr/share/" + "long-" * 40, b"long name"),
    file("usr/share/empty", b"", 0o000),
    directory("usr/share/ro", 0o500),
    file("usr/share/ro/inside", b"written before the directory became read-only", 0o444),
]

EXPECTED: dict[str, tuple[str, int, Any]] = {
    ".rpack": ("dir", 0o755, None),
    MANIFEST_PATH: ("file", 0o644, None),  # contents compared separately
    "bin": ("symlink", 0, "usr/bin"),
    "dev": ("dir", 0o755, None),
    "etc": ("dir", 0o755, None),
    "etc/ld.so.cache": ("file", 0o644, b"cache"),
    "lib": ("dir", 0o755, None),
    "lib/x86_64-linux-gnu": ("dir", 0o755, None),
    "lib/x86_64-linux-gnu/libc.so.6": ("file", 0o755, b"\x7fELF libc"),
    "lib64": ("dir", 0o755, None),
    "lib64/ld.so": ("symlink", 0, LD_SO),
    "loop-a": ("symlink", 0, "loop-b"),
    "loop-b": ("symlink", 0, "loop-a"),
    "proc": ("dir", 0o755, None),
    "tmp": ("dir", 0o1777, None),
    "up": ("symlink", 0, "../../../../etc"),
    "usr": ("dir", 0o750, None),
    "usr/bin": ("dir", 0o755, None),
    "usr/bin/busybox": ("file", 0o755, b"\x7fELF busybox"),
    "usr/bin/ls": ("file", 0o755, b"\x7fELF busybox"),
    "usr/bin/dash": ("file", 0o755, b"\x7fELF dash"),
    "usr/bin/sh": ("symlink", 0, "dash"),
    "usr/share": ("dir", 0o755, None),
    "usr/share/big": ("file", 0o644, BIG),
    "usr/share/caf\u00e9": ("file", 0o644, b"non-ascii name"),
    "usr/share/" + "long-" * 40: ("file", 0o644, b"long name"),
    "usr/share/empty": ("file", 0o600, b""),
    "usr/share/ro": ("dir", 0o700, None),
    "usr/share/ro/inside": ("file", 0o644, b"written before the directory became read-only"),
}


def rootfs_archive() -> bytes:
    return zst(tar(*ROOTFS))


def check_rootfs(dest: Path, result: dict[str, Any]) -> None:
    assert result["format"] == FORMAT and result["entrypoint"] == ["/bin/sh"]
    assert len(result["entries"]) == len(ROOTFS) - 1  # all but the "./" entry
    found = tree(dest)
    assert json.loads(found.pop(MANIFEST_PATH)[2]) == result
    expected = dict(EXPECTED)
    del expected[MANIFEST_PATH]
    assert found == expected

    busybox, ls = (dest / "usr/bin/busybox").stat(), (dest / "usr/bin/ls").stat()
    assert (busybox.st_ino, busybox.st_nlink) == (ls.st_ino, 2)
    assert (dest / "usr/bin/dash").stat().st_mtime == MTIME


def test_rootfs_extracts_exactly(dest: Path, host: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = snapshot(dest.parent, dest)
    result = extract(io.BytesIO(rootfs_archive()), dest)
    check_rootfs(dest, result)
    assert snapshot(dest.parent, dest) == before
    assert "stripped setuid/setgid bits from 1 member" in caplog.text


def test_gnu_style_dot_slash_names(dest: Path) -> None:
    members = [file("./usr/bin/x", b"x"), hardlink("./usr/bin/y", "./usr/bin/x"),
               directory("./")]
    head = encode(directory("./")) + manifest_member(manifest(entries(members)))
    data = archive(*members, head=head)
    extract(io.BytesIO(data), dest)
    assert (dest / "usr/bin/y").read_bytes() == b"x"
    assert (dest / "usr/bin/x").stat().st_nlink == 2


def test_several_zstd_frames(dest: Path) -> None:
    raw = tar(file("a", b"a" * 100_000), file("b", b"b"))
    extract(io.BytesIO(zst(raw[:70_000]) + zst(raw[70_000:])), dest)
    assert (dest / "a").read_bytes() == b"a" * 100_000


def test_mtime_clamped(dest: Path) -> None:
    data = archive(
        file("negative", pax={"mtime": "-5"}),
        file("fraction", pax={"mtime": "1234.75"}),
        Raw(raw_header(b"huge", b"0", mtime_field=b"\x80" + b"\xff" * 11), file_entry("huge")),
        file("nonsense", pax={"mtime": "1e400"}),
        file("nan", pax={"mtime": "nan"}),
        file("minus-e20", pax={"mtime": "-1e20"}),
    )
    extract(io.BytesIO(data), dest)
    assert (dest / "negative").stat().st_mtime == 0
    assert (dest / "fraction").stat().st_mtime == 1234
    assert (dest / "huge").stat().st_mtime == 2**32 - 1
    for ignored in ("nonsense", "nan", "minus-e20"):
        assert (dest / ignored).stat().st_mtime == MTIME


def test_non_seekable_source(dest: Path) -> None:
    data = rootfs_archive()
    read_fd, write_fd = os.pipe()

    def writer() -> None:
        with open(write_fd, "wb", buffering=0) as pipe:
            for start in range(0, len(data), 4099):
                pipe.write(data[start : start + 4099])

    thread = threading.Thread(target=writer)
    thread.start()
    with open(read_fd, "rb", buffering=0) as source:
        assert not source.seekable()
        result = extract(source, dest)
    thread.join()
    check_rootfs(dest, result)


def test_truncated_through_pipe(dest: Path) -> None:
    data = rootfs_archive()
    read_fd, write_fd = os.pipe()

    def writer() -> None:
        with open(write_fd, "wb", buffering=0) as pipe:
            pipe.write(data[: len(data) // 2])

    thread = threading.Thread(target=writer)
    thread.start()
    with open(read_fd, "rb", buffering=0) as source, pytest.raises(UnpackError, match="truncated"):
        extract(source, dest)
    thread.join()
    assert os.listdir(dest) == []


# --- the zstd layer and the stream as a whole ------------------------------------------------


def test_truncated_in_the_middle(dest: Path) -> None:
    data = rootfs_archive()
    refuse(data[: len(data) // 2], dest, None, r"^truncated archive \(zstd frame incomplete\)$")


@pytest.mark.parametrize("cut", [1, 4, 9, 100])
def test_truncated_at_the_end(dest: Path, cut: int) -> None:
    refuse(rootfs_archive()[:-cut], dest, None, r"^truncated archive \(zstd frame incomplete\)$")


def test_trailing_garbage_after_zstd(dest: Path) -> None:
    refuse(rootfs_archive() + b"garbage!", dest, None, r"^data after end of archive")


def test_skippable_frame_refused(dest: Path) -> None:
    skippable = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"skip"
    refuse(archive(file("a")) + skippable, dest, None, r"skippable zstd frame refused")


def test_trailing_data_after_tar_end(dest: Path) -> None:
    raw = tar(file("a", b"a")) + pad(b"hidden")
    refuse(zst(raw), dest, None, r"^data after end of archive$")


def test_concatenated_tar_refused(dest: Path) -> None:
    raw = tar(file("a", b"a")) + tar(file("hidden"), head=b"")
    refuse(zst(raw), dest, None, r"^data after end of archive$")


def test_too_much_padding_after_tar_end(dest: Path) -> None:
    refuse(archive(file("a"), end=bytes(17 << 20)), dest, None, r"padding after end of archive")


def test_missing_end_marker(dest: Path) -> None:
    refuse(archive(file("a", b"a"), end=b""), dest, None, r"no end-of-archive marker")


def test_lone_zero_block(dest: Path) -> None:
    refuse(archive(file("a", b"a"), end=bytes(512)), dest, None, r"incomplete end-of-archive")


def test_frame_without_checksum(dest: Path) -> None:
    data = zstandard.ZstdCompressor(write_checksum=False).compress(tar(file("a")))
    refuse(data, dest, None, r"zstd frame has no content checksum")


def test_window_too_large(dest: Path) -> None:
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28, write_checksum=1)
    sink = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(
        sink, closefd=False
    ) as writer:
        writer.write(tar(file("a", b"a")))
    refuse(sink.getvalue(), dest, None, r"zstd window of 268435456 bytes exceeds")


def test_corrupt_frame(dest: Path) -> None:
    data = bytearray(archive(file("a", os.urandom(50_000))))
    data[len(data) // 2] ^= 0x10
    with pytest.raises(UnpackError, match="corrupt archive|truncated|checksum"):
        extract(io.BytesIO(bytes(data)), dest)
    assert os.listdir(dest) == []


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", r"^empty archive$"),
        (tar(file("a")), r"^not a zstd archive$"),
        (b"\x1f\x8b\x08\x00" + bytes(100), r"^not a zstd archive$"),
    ],
    ids=["empty", "plain-tar", "gzip"],
)
def test_not_an_archive(dest: Path, data: bytes, match: str) -> None:
    refuse(data, dest, None, match)


# --- the manifest ----------------------------------------------------------------------------


def test_empty_tar_has_no_manifest(dest: Path) -> None:
    refuse(zst(bytes(10240)), dest, None, r"^archive has no manifest$")


def test_manifest_must_come_first(dest: Path) -> None:
    head = encode(file("etc/passwd", b"x")) + manifest_member()
    refuse(archive(head=head), dest, "etc/passwd", r"first member must be '.rpack/manifest.json'")


def test_manifest_symlink_refused(dest: Path, host: Path) -> None:
    head = encode(symlink(MANIFEST_PATH, str(host / "victim")))
    refuse(archive(head=head), dest, MANIFEST_PATH, r"manifest must be a regular file")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{not json", r"invalid manifest \(expecting property name"),
        (b"[1, 2]", r"invalid manifest \(not a json object\)"),
        (b'{"format": "rpack/1", "format": "rpack/1"}', r"duplicate key 'format'"),
        (b'{"format": NaN}', r"invalid manifest \(nan is not json\)"),
        (b'{"format": "rpack/2"}', r"unsupported archive format 'rpack/2'"),
        (b"\xff{}", r"invalid manifest \('utf-8' codec"),
    ],
)
def test_invalid_manifest(dest: Path, content: bytes, match: str) -> None:
    refuse(archive(head=encode(file(MANIFEST_PATH, content))), dest, MANIFEST_PATH, match)


def test_manifest_too_large(dest: Path) -> None:
    head = raw_header(MANIFEST_PATH.encode(), b"0", (16 << 20) + 1)
    refuse(zst(head), dest, MANIFEST_PATH, r"manifest larger than 16777216 bytes")


def test_tar_cut_at_a_member_boundary(dest: Path) -> None:
    # Case B11: a complete, checksummed frame around a tar that lost its last members.
    members = [file("a", b"a"), directory("d"), file("d/b", b"b"), symlink("d/c", "b")]
    head = manifest_member(manifest(entries(members)))
    refuse(archive(*members[:2], head=head), dest, None,
           r"^manifest lists 2 entries not present in the archive \(the first is 'd/b'\)$")
    refuse(archive(*members[:2], head=head, end=b""), dest, None,
           r"^truncated archive \(no end-of-archive marker\)$")


def test_size_beyond_the_data(dest: Path) -> None:
    # Case B14: the header claims more data than the stream holds before its end.
    member = Raw(raw_header(b"big", b"0", 10_000) + bytes(512), file_entry("big", bytes(10_000)))
    refuse(archive(member, end=b""), dest, "big", r": truncated archive \(member data cut short\)$")


def manifest_with(members: list[Member], **changes: Any) -> bytes:
    """The faithful manifest of `members`, with the last entry's fields changed."""
    listed = entries(members)
    listed[-1].update(changes)
    listed[-1] = {key: value for key, value in listed[-1].items() if value is not None}
    return manifest_member(manifest(listed))


@pytest.mark.parametrize(
    ("member", "changes", "match"),
    [
        (file("f", b"data"), {"type": "dir", "size": None, "sha256": None},
         r"type file differs from the manifest's dir"),
        (file("f", b"data", 0o4755), {"mode": 0o755},
         r"mode 4755 differs from the manifest's 0755"),
        (file("f", b"data"), {"size": 5}, r"size 4 differs from the manifest's 5"),
        (symlink("s", "/etc/passwd"), {"target": "/etc/group"},
         r"link target '/etc/passwd' differs from the manifest's '/etc/group'"),
        (hardlink("h", "a"), {"target": "b"}, r"link target 'a' differs from the manifest's 'b'"),
        (file("f", b"data"), {"sha256": "0" * 64},
         r"checksum mismatch \(sha256 3a6eb079\w{56}, the manifest says 0{64}\)$"),
        (file("f", b"data"), {"path": "g"}, r"unexpected member \(not in the manifest\)"),
    ],
    ids=["type", "mode", "size", "target", "hardlink-target", "sha256", "unexpected"],
)
def test_member_differs_from_manifest(dest: Path, member: Member, changes: dict[str, Any],
                                      match: str) -> None:
    members = [file("a", b"a"), file("b", b"b"), member]
    name = member[0].name
    refuse(archive(*members, file("z", b"later"), head=manifest_with(members, **changes)), dest,
           name, match)


def test_checksum_checked_as_data_streams(dest: Path) -> None:
    # Case H83 on a member big enough to be written in several chunks before the mismatch shows.
    members = [file("usr/bin/prog", os.urandom(3 << 20), 0o755)]
    head = manifest_with(members, sha256="f" * 64)
    refuse(archive(*members, head=head), dest, "usr/bin/prog", r"^member 'usr/bin/prog': checksum")


def test_member_not_in_manifest(dest: Path) -> None:
    # Case H84: the manifest is faithful except that it leaves one member out.
    members = [file("a", b"a"), file("x", b"hidden"), file("z", b"z")]
    head = manifest_member(manifest(entries([members[0], members[2]])))
    refuse(archive(*members, head=head), dest, "x", r"unexpected member \(not in the manifest\)")


def test_members_out_of_manifest_order(dest: Path) -> None:
    members = [file("a", b"a"), file("b", b"b")]
    head = manifest_member(manifest(entries(members[::-1])))
    refuse(archive(*members, head=head), dest, "a", r"out of manifest order \('b' comes next\)")


def test_manifest_lists_a_member_once(dest: Path) -> None:
    members = [directory("d"), directory("d", 0o700)]
    head = manifest_member(manifest(entries(members[:1])))
    refuse(archive(*members, head=head), dest, "d/",
           r"out of manifest order \(all its entries were seen\)")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"entries": None}, r"'entries' is not a list"),
        ({"entries": [{"path": "a"}]}, r"entry 'a': unknown type 'None'"),
        ({"entries": [{"path": "a", "type": []}]}, r"entry 'a': unknown type '\[\]'"),
        ({"entries": [["a"]]}, r"entry 0 is not an object with a 'path'"),
        ({"entries": [{"path": "a", "type": "dir", "mode": True}]}, r"'mode' is not a number"),
        ({"entries": [{"path": "a", "type": "dir", "mode": 0o10000}]}, r"'mode' is not a number"),
        ({"entries": [{"path": "a", "type": "file", "mode": 420, "size": -1, "sha256": "0" * 64}]},
         r"'size' is not a number of bytes"),
        ({"entries": [{"path": "a", "type": "file", "mode": 420, "size": 0, "sha256": "A" * 64}]},
         r"'sha256' is not 64 lowercase hex digits"),
        ({"entries": [{"path": "a", "type": "symlink", "mode": 511}]}, r"'target' is not a string"),
        ({"platform": None}, r"'platform' is not an object"),
        ({"platform": {**HOST_PLATFORM, "elf_class": 16}}, r"'elf_class' is not 32 or 64"),
        ({"platform": {**HOST_PLATFORM, "min_kernel": "new"}}, r"'min_kernel' is not a version"),
        ({"totals": {"entries": 1, "bytes": 0}}, r"'totals' do not match the entries \(0 entries"),
    ],
)
def test_invalid_manifest_schema(dest: Path, change: dict[str, Any], match: str) -> None:
    obj = manifest()
    obj.update(change)
    obj = {key: value for key, value in obj.items() if value is not None}
    refuse(archive(head=manifest_member(obj)), dest, MANIFEST_PATH,
           r"invalid manifest \(.*" + match)


# --- the platform ----------------------------------------------------------------------------

HOST = f"{os.uname().machine} ({HOST_PLATFORM['elf_class']}-bit, {sys.byteorder}-endian)"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"machine": "aarch64"}, rf"^archive is for aarch64 \(64-bit, little-endian\), this host "
                                 rf"is {re.escape(HOST)}$"),
        ({"elf_class": 32}, r"^archive is for \S+ \(32-bit, little-endian\), this host is "),
        ({"endian": "big"}, r"^archive is for \S+ \(64-bit, big-endian\), this host is "),
        ({"min_kernel": "999.1"},
         rf"^archive needs linux 999\.1 or later, this host runs {re.escape(os.uname().release)}$"),
    ],
    ids=["machine", "elf-class", "endian", "kernel"],
)
def test_platform_refused(dest: Path, change: dict[str, Any], match: str) -> None:
    members = [file("a", b"a")]
    data = archive(*members, head=manifest_member(manifest(
        entries(members), platform={**HOST_PLATFORM, **change})))
    refuse(data, dest, None, match)
    assert verify(io.BytesIO(data), check_platform=False).members == 2


def test_platform_allowed(dest: Path) -> None:
    members = [file("a", b"a")]
    for change in ({"min_kernel": None}, {"min_kernel": "2.6"}, {"libc": "musl"}):
        data = archive(*members, head=manifest_member(manifest(
            entries(members), platform={**HOST_PLATFORM, **change})))
        assert verify(io.BytesIO(data)).members == 2


# --- names -----------------------------------------------------------------------------------


def test_absolute_name(dest: Path, host: Path) -> None:
    name = str(host / "victim")
    refuse(archive(file(name, b"pwned")), dest, name, r"absolute name refused")


@pytest.mark.parametrize("name", ["../host/victim", "a/../../host/victim", "a/..", "a/../b"])
def test_dotdot_component(dest: Path, name: str) -> None:
    refuse(archive(file(name, b"pwned")), dest, name, r": '\.\.' component refused$")


def test_pax_path_override_is_what_counts(dest: Path) -> None:
    member = file("innocent", b"pwned", pax={"path": "../host/victim"})
    refuse(archive(member), dest, "../host/victim", r"'\.\.' component refused")


@pytest.mark.parametrize(
    ("member", "name"),
    [
        (file("."), "."),
        (file(""), ""),
        (symlink(".", "/"), "."),
        (hardlink("./.", MANIFEST_PATH), "./."),
    ],
    ids=["dot-file", "empty-file", "dot-symlink", "dot-hardlink"],
)
def test_name_of_the_root_for_non_directory(dest: Path, member: Member, name: str) -> None:
    refuse(archive(member), dest, name, r"empty or '\.' name refused for a non-directory")


def test_trailing_slash_on_file(dest: Path) -> None:
    refuse(archive(raw_header(b"f/", b"0")), dest, "f/", r"trailing '/' on a non-directory")


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "esc\x1b[31m", "del\x7f", "c1\x85x"])
def test_control_character(dest: Path, name: str) -> None:
    refuse(archive(file(name)), dest, name, r"control character in name")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "pax"])
def test_non_utf8_name(dest: Path, fmt: int) -> None:
    name = "caf\udce9"  # the byte 0xe9 alone: latin-1, not UTF-8
    refuse(archive(encode(file(name), fmt)), dest, name, r"name is not valid utf-8")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("a" * 256, r"component longer than 255 bytes"),
        ("/".join(["d" * 200] * 21), r"name longer than 4095 bytes"),
        ("/".join(["d"] * 129), r"depth 129 exceeds the limit of 128 \(--max-depth\)"),
    ],
    ids=["component", "path", "depth"],
)
def test_over_long(dest: Path, name: str, match: str) -> None:
    refuse(archive(file(name)), dest, name, match)


def test_names_differing_in_case(dest: Path) -> None:
    # Case C35 on a case-sensitive filesystem; on a casefolded one O_EXCL turns it into EEXIST.
    extract(io.BytesIO(archive(file("Lib/x", b"x"), file("lib/y", b"y"))), dest)
    assert sorted(os.listdir(dest)) == [".rpack", "Lib", "lib"]


# --- links, duplicates, the tree model -------------------------------------------------------


def test_write_through_absolute_symlink(dest: Path, host: Path) -> None:
    data = archive(symlink("l", str(host / "victimdir")), file("l/pwn", b"pwned"))
    refuse(data, dest, "l/pwn", r"would be created through symlink 'l'")


def test_write_through_relative_symlink_inside(dest: Path) -> None:
    data = archive(directory("usr/lib"), symlink("lib", "usr/lib"), file("lib/libc.so.6"))
    refuse(data, dest, "lib/libc.so.6", r"would be created through symlink 'lib'")


def test_directory_through_symlink(dest: Path, host: Path) -> None:
    data = archive(symlink("l", str(host)), directory("l/sub"))
    refuse(data, dest, "l/sub/", r"would be created through symlink 'l'")


def test_below_a_file(dest: Path) -> None:
    data = archive(file("f", b"f"), hardlink("h", "f"), file("h/x"))
    refuse(data, dest, "h/x", r"would be created below file 'h'")


@pytest.mark.parametrize(
    ("members", "name", "kind"),
    [
        ([file("f"), file("f")], "f", "file"),
        ([symlink("f", "{host}/victim"), file("f", b"pwned")], "f", "symlink"),
        ([file("f"), hardlink("h", "f"), file("h", b"pwned")], "h", "file"),
        ([directory("d"), symlink("d", "{host}")], "d", "dir"),
        ([symlink("d", "{host}"), directory("d")], "d/", "symlink"),
        ([file("f"), directory("f")], "f/", "file"),
        ([file("a/b"), file("a")], "a", "dir"),
        ([file(MANIFEST_PATH, b"{}")], MANIFEST_PATH, "file"),
    ],
    ids=["file-file", "symlink-file", "hardlink-file", "dir-symlink", "symlink-dir",
         "file-dir", "implicit-dir-file", "manifest-again"],
)
def test_duplicate(dest: Path, host: Path, members: list[Member], name: str, kind: str) -> None:
    for ti, _ in members:
        ti.linkname = ti.linkname.format(host=host)
    refuse(archive(*members), dest, name, rf"duplicate member refused \(already a {kind}\)")


@pytest.mark.parametrize(
    ("members", "target", "match"),
    [
        ([], "{host}/victim", r"hardlink target '.*/host/victim': absolute name refused"),
        ([], "../host/victim", r"hardlink target '\.\./host/victim': '\.\.' component refused"),
        ([], "", r"hardlink target '': empty or '\.' name refused"),
        ([], "later", r"hardlink target 'later' is not an earlier regular file"),
        ([symlink("s", "{host}/victim")], "s", r"target 's' is not an earlier regular file"),
        ([directory("d")], "d", r"target 'd' is not an earlier regular file"),
        ([], "h", r"target 'h' is not an earlier regular file"),
        ([symlink("l", "{host}")], "l/victim", r"target 'l/victim' is not an earlier regular"),
    ],
    ids=["absolute", "dotdot", "empty", "later", "symlink", "dir", "itself", "through-symlink"],
)
def test_hardlink_refused(dest: Path, host: Path, members: list[Member], target: str,
                          match: str) -> None:
    for ti, _ in members:
        ti.linkname = ti.linkname.format(host=host)
    data = archive(*members, hardlink("h", target.format(host=host)), file("later"),
                   file("h", b"pwned"))
    refuse(data, dest, "h", match)


def test_symlink_target_checks(dest: Path) -> None:
    refuse(archive(symlink("s", "")), dest, "s", r"empty symlink target refused")
    refuse(archive(symlink("s", "a\nb")), dest, "s", r"control character in symlink target")


# --- types, headers, sizes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "what"),
    [(tarfile.CHRTYPE, "character device"), (tarfile.BLKTYPE, "block device"),
     (tarfile.FIFOTYPE, "fifo")],
)
def test_special_file(dest: Path, kind: bytes, what: str) -> None:
    ti = info("dev/null", kind, mode=0o666)
    ti.devmajor, ti.devminor = 1, 3
    refuse(archive((ti, b"")), dest, "dev/null", rf"special file \({what}\) refused")


@pytest.mark.parametrize(
    ("block", "name", "match"),
    [
        (raw_header(b"sparse", b"S"), "sparse", r"sparse member refused"),
        (raw_header(b"cont", b"7"), "cont", r"contiguous file type refused"),
        (raw_header(b"z", b"Z"), "z", r"unknown type 'Z'"),
        (raw_header(b"v", b"V"), "v", r"unknown type 'V'"),
        (raw_header(b"n", b"N"), "n", r"unknown type 'N'"),
        (raw_header(b"dump", b"D"), "dump", r"unknown type 'D'"),
        (raw_header(b"sol", b"X"), "sol", r"unknown type 'X'"),
    ],
)
def test_unsupported_type(dest: Path, block: bytes, name: str, match: str) -> None:
    refuse(archive(block), dest, name, match)


def test_pax_sparse_refused(dest: Path) -> None:
    sparse = {"GNU.sparse.numblocks": "1", "GNU.sparse.map": "0,1",
              "GNU.sparse.size": "1000000000000"}
    refuse(archive(file("bomb", b"x", pax=sparse)), dest, "bomb", r"sparse member refused")


def test_gnu_long_name_refused(dest: Path) -> None:
    member = encode(file("x" * 150), tarfile.GNU_FORMAT)
    refuse(archive(member), dest, "././@LongLink", r"gnu long name header refused")


def test_gnu_long_link_refused(dest: Path) -> None:
    member = encode(symlink("s", "t" * 150), tarfile.GNU_FORMAT)
    refuse(archive(member), dest, "././@LongLink", r"gnu long link header refused")


def test_global_pax_header_refused(dest: Path) -> None:
    block = pax_header(pax_records(path="../host/victim"), b"g", b"pax_global_header")
    refuse(archive(block, file("a")), dest, "pax_global_header", r"global pax header refused")


@pytest.mark.parametrize(
    ("records", "match"),
    [
        (b"99 path=x\n", r"malformed pax header"),
        (b"abc path=x\n", r"malformed pax header"),
        (pax_records(path="a") * 2, r"duplicate pax record 'path'"),
        (pax_records(size="-5"), r"invalid pax size"),
    ],
)
def test_bad_pax_header(dest: Path, records: bytes, match: str) -> None:
    refuse(archive(pax_header(records) + raw_header(b"a", b"0")), dest, "././@PaxHeader", match)


def test_pax_header_too_large(dest: Path) -> None:
    block = raw_header(b"././@PaxHeader", b"x", 1 << 30)
    refuse(archive(block), dest, "././@PaxHeader", r"pax header of 1073741824 bytes exceeds")


@pytest.mark.parametrize(
    "records",
    [b"1" * 60_000, pax_records(comment="1" * 60_000)[:60_000], pax_records(comment="1" * 60_000)],
    ids=["digits", "cut-record", "long-record"],
)
def test_pax_parsing_is_linear(dest: Path, records: bytes) -> None:
    # CVE-2024-6232: 80 kB of digits took 5.6 s in Python 3.11.7's own tarfile parser.
    data = archive(Raw(pax_header(records) + raw_header(b"a", b"0"), file_entry("a")), file("b"))
    started = time.monotonic()
    try:
        extract(io.BytesIO(data), dest)
    except UnpackError as exc:
        assert "malformed pax header" in str(exc)
    assert time.monotonic() - started < 1


def test_negative_size(dest: Path) -> None:
    block = raw_header(b"neg", b"0", size_field=b"\xff" * 12)
    refuse(archive(block), dest, "neg", r"negative size refused")


def test_huge_pax_size(dest: Path) -> None:
    member = pax_header(pax_records(size=str(10**15))) + raw_header(b"huge", b"0")
    refuse(archive(member), dest, "huge", r"size 1000000000000000 exceeds the size limit of")


def test_data_on_a_directory(dest: Path) -> None:
    refuse(archive(raw_header(b"d/", b"5", 512) + bytes(512)), dest, "d/",
           r"dir member with data refused")


def test_bad_header_checksum(dest: Path) -> None:
    block = bytearray(raw_header(b"a", b"0"))
    block[0] = ord("b")
    refuse(archive(bytes(block)), dest, None, r"corrupt archive \(invalid tar header at offset")


# --- limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "members", "name", "match"),
    [
        (Limits(max_members=3), [file("a"), file("b"), file("c")], "c",
         r"too many members \(limit 3, --max-members\)"),
        (Limits(max_member_size=1000), [file("a", bytes(1001))], "a",
         r"size 1001 exceeds the size limit of 1000 bytes \(--max-member-size\)"),
        # The manifest's bytes count too.
        (Limits(max_total_bytes=3000), [file("a", bytes(1500)), file("b", bytes(1500))], "b",
         r"total size exceeds the size limit of 3000 bytes \(--max-total-size\)"),
        (Limits(max_depth=3), [file("a/b/c/d")], "a/b/c/d",
         r"depth 4 exceeds the limit of 3 \(--max-depth\)"),
    ],
    ids=["members", "member-size", "total", "depth"],
)
def test_limits(dest: Path, limits: Limits, members: list[Member], name: str, match: str) -> None:
    refuse(archive(*members), dest, name, match, limits)


# --- modes, the destination, cleanup ---------------------------------------------------------


def test_destination_must_be_empty(dest: Path) -> None:
    (dest / "mine").write_bytes(b"keep")
    with pytest.raises(UnpackError, match="is not empty"):
        extract(io.BytesIO(archive(file("a"))), dest)
    assert os.listdir(dest) == ["mine"]


def test_destination_symlink_refused(dest: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(dest)
    with pytest.raises(UnpackError, match="cannot open destination"):
        extract(io.BytesIO(archive(file("a"))), tmp_path / "link")


def modes(root: Path) -> dict[str, int]:
    return {path.name: stat.S_IMODE(path.lstat().st_mode) for path in root.iterdir()
            if path.name != ".rpack"}


SETID_MEMBERS = [file("suid", b"x", 0o4755), file("sgid", b"x", 0o2755),
                 directory("sgid-dir", 0o2775), directory("tmp", 0o1777)]


def test_setuid_and_setgid_stripped(dest: Path) -> None:
    # Cases E48 and E49: set-id bits go, the sticky bit of a directory stays.
    extract(io.BytesIO(archive(*SETID_MEMBERS)), dest)
    assert modes(dest) == {"suid": 0o755, "sgid": 0o755, "sgid-dir": 0o775, "tmp": 0o1777}


def test_trust_setuid(dest: Path) -> None:
    extract(io.BytesIO(archive(*SETID_MEMBERS)), dest, trust_setuid=True)
    assert modes(dest) == {"suid": 0o4755, "sgid": 0o2755, "sgid-dir": 0o2775, "tmp": 0o1777}


def owned(member: Member, uid: int = 1234, gid: int = 4321) -> Member:
    member[0].uid, member[0].gid = uid, gid
    return member


OWNED = [owned(directory("d")), owned(file("d/f", b"f", 0o4755)), owned(symlink("d/s", "f")),
         owned(hardlink("d/h", "d/f"), 99, 99)]


def owners(root: Path) -> dict[str, tuple[int, int]]:
    return {name: (st.st_uid, st.st_gid) for name in ("d", "d/f", "d/s", "d/h")
            for st in [(root / name).lstat()]}


@pytest.mark.root
@root_only
def test_ownership_ignored(dest: Path) -> None:
    # Case E52: no --numeric-owner, so the extracting user owns everything.
    extract(io.BytesIO(archive(*OWNED)), dest)
    assert set(owners(dest).values()) == {(0, 0)}


@pytest.mark.root
@root_only
def test_numeric_owner(dest: Path) -> None:
    extract(io.BytesIO(archive(*OWNED)), dest, numeric_owner=True, trust_setuid=True)
    # The hard link is the file's inode: the file member gave it its owner.
    assert set(owners(dest).values()) == {(1234, 4321)}
    assert stat.S_IMODE((dest / "d/f").stat().st_mode) == 0o4755  # chown came first


@pytest.mark.root
@root_only
@pytest.mark.parametrize(
    ("pax", "match"),
    [({"uid": str(2**32 - 1)}, r"uid 4294967295 out of range"),
     ({"gid": "-1"}, r"pax gid record is not a number")],
)
def test_numeric_owner_refuses_unusable_ids(dest: Path, pax: dict[str, str], match: str) -> None:
    data = archive(file("f", b"f", pax=pax))
    with pytest.raises(UnpackError, match=match):
        extract(io.BytesIO(data), dest, numeric_owner=True)
    assert os.listdir(dest) == []
    extract(io.BytesIO(data), dest)  # ignored ids are not checked


@pytest.mark.root
@root_only
def test_not_enough_space(dest: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        (small / "dest").mkdir()
        with pytest.raises(UnpackError, match=r"^not enough space: the archive's files take "
                           r"4194\d{3} bytes, the destination has \d+ bytes free$"):
            extract(io.BytesIO(archive(file("big", bytes(4 << 20)))), small / "dest")
        assert os.listdir(small / "dest") == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_failure_late_removes_everything(dest: Path) -> None:
    # Deep directories, read-only modes, links: all created before the refusal at the end.
    members = [*ROOTFS, file("/".join(["deep"] * 100), b"x"), symlink("s", "/"),
               file("zzz", b"z", pax={"path": "zzz\n"})]
    refuse(archive(*members), dest, "zzz\n", r"control character in name")


def test_clear_directory_deep_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        level = os.dup(fd)
        for _ in range(3000):  # far deeper than any path could spell, or fds allow
            os.mkdir("d", dir_fd=level)
            deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=level)
            os.close(level)
            level = deeper
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=level))
        os.close(level)
        clear_directory(fd)
    finally:
        os.close(fd)
    assert os.listdir(root) == []


# --- unprivileged ----------------------------------------------------------------------------


def as_nobody(cwd: Path, action: Callable[[], None]) -> str:
    """Run `action` in a child with uid and gid 65534 and `cwd` as its working directory."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        outcome = b"ok"
        try:
            os.close(read_fd)
            os.chdir(cwd)  # while root: the test's tmp_path is not searchable for nobody
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}".encode()
        finally:
            os.write(write_fd, outcome)
            os._exit(0)
    os.close(write_fd)
    with open(read_fd, "rb") as pipe:
        outcome_text = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome_text


def owned_by_nobody(paths: Iterable[Path]) -> None:
    for path in paths:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)



@pytest.fixture
def searchable(tmp_path: Path) -> Iterator[None]:
    """Let uid 65534 reach tmp_path, so that a symlink it follows by mistake would land."""
    changed = []
    for path in [tmp_path, *tmp_path.parents]:
        mode = path.stat().st_mode
        if mode & stat.S_IXOTH:
            break
        os.chmod(path, stat.S_IMODE(mode) | stat.S_IXOTH)
        changed.append((path, stat.S_IMODE(mode)))
    yield
    for path, mode in changed:
        os.chmod(path, mode)


@pytest.mark.root
@root_only
def test_extract_unprivileged(dest: Path, host: Path) -> None:
    owned_by_nobody([dest])
    data = rootfs_archive()
    result: dict[str, Any] = {}

    def action() -> None:
        result.update(extract(io.BytesIO(data), "."))
        assert os.getuid() == NOBODY and result["format"] == FORMAT

    before = snapshot(dest.parent, dest)
    assert as_nobody(dest, action) == "ok"
    check_rootfs(dest, json.loads((dest / MANIFEST_PATH).read_bytes()))
    assert (dest / "usr/bin/dash").stat().st_uid == NOBODY
    assert snapshot(dest.parent, dest) == before


@pytest.mark.root
@root_only
@pytest.mark.usefixtures("searchable")
def test_refusal_unprivileged(dest: Path, host: Path) -> None:
    owned_by_nobody([dest, host, host / "victim"])
    data = archive(*ROOTFS, symlink("l", str(host)), file("l/victim", b"pwned"))

    def action() -> None:
        with pytest.raises(UnpackError, match="would be created through symlink 'l'"):
            extract(io.BytesIO(data), ".")
        assert os.listdir(".") == []

    assert as_nobody(dest, action) == "ok"
    assert (host / "victim").read_bytes() == b"original"


@pytest.mark.root
@root_only
def test_platform_checked_before_anything_is_created(dest: Path) -> None:
    # nobody may read dest but not write to it: creating even the manifest would fail.
    os.chmod(dest, 0o755)
    members = [file("a", b"a")]
    foreign = archive(*members, head=manifest_member(manifest(
        entries(members), platform={**HOST_PLATFORM, "machine": "aarch64"})))

    def action(data: bytes, match: str) -> Callable[[], None]:
        def run() -> None:
            with pytest.raises(UnpackError, match=match):
                extract(io.BytesIO(data), ".")
        return run

    assert as_nobody(dest, action(foreign, "archive is for aarch64")) == "ok"
    assert as_nobody(dest, action(archive(*members), "permission denied")) == "ok"


@pytest.mark.root
@root_only
def test_numeric_owner_needs_root(dest: Path) -> None:
    owned_by_nobody([dest])

    def action() -> None:
        with pytest.raises(UnpackError, match="^numeric ownership needs root$"):
            extract(io.BytesIO(archive(file("a"))), ".", numeric_owner=True)

    assert as_nobody(dest, action) == "ok"


@pytest.mark.root
@root_only
@pytest.mark.usefixtures("searchable")
def test_clear_directory_unprivileged(dest: Path, host: Path) -> None:
    owned_by_nobody([dest, host / "victim", host / "victimdir"])
    os.chmod(host / "victim", 0o644)
    os.chmod(host / "victimdir", 0o755)

    def action() -> None:
        os.makedirs("a/locked/deeper")
        Path("a/locked/deeper/f").write_bytes(b"f")
        Path("a/f").write_bytes(b"f")
        os.symlink(host / "victim", "a/link-to-file")
        os.symlink(host / "victimdir", "a/link-to-dir")
        os.chmod("a/locked/deeper", 0o000)
        os.chmod("a/locked", 0o000)
        os.chmod("a", 0o500)
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            clear_directory(fd)
        finally:
            os.close(fd)
        assert os.listdir(".") == []

    before = snapshot(dest.parent, dest)
    assert as_nobody(dest, action) == "ok"
    assert snapshot(dest.parent, dest) == before
    assert stat.S_IMODE((host / "victimdir").stat().st_mode) == 0o755
