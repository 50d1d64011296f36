"""Archives built in the tests, valid and hostile, and the snapshot that shows what they changed."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import sys
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from unpacker.format import FORMAT, MANIFEST_PATH

MTIME = 1_700_000_000

Member = tuple[tarfile.TarInfo, bytes]

# The platform of this host, as the packer would write it for a program of this host.
HOST_PLATFORM = {
    "machine": os.uname().machine,
    "elf_class": struct.calcsize("P") * 8,
    "endian": sys.byteorder,
    "libc": "glibc",
    "libc_version": "2.36",
    "min_kernel": "3.2.0",
}

_TYPES = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir",
          tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink"}


def info(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, linkname: str = "",
         mtime: float = MTIME, pax: dict[str, str] | None = None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.linkname, ti.mtime = kind, mode, linkname, mtime
    ti.pax_headers = pax or {}
    return ti


def file(name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> Member:
    return info(name, mode=mode, **kw), data


def directory(name: str, mode: int = 0o755) -> Member:
    return info(name, tarfile.DIRTYPE, mode=mode), b""


def symlink(name: str, target: str) -> Member:
    return info(name, tarfile.SYMTYPE, mode=0o777, linkname=target), b""


def hardlink(name: str, target: str) -> Member:
    return info(name, tarfile.LNKTYPE, linkname=target), b""


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def encode(member: Member, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    ti, data = member
    if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        ti.size = len(data)
    return ti.tobuf(fmt, "utf-8", "surrogateescape") + pad(data)


def raw_header(name: bytes, typeflag: bytes, size: int = 0, *, linkname: bytes = b"",
               size_field: bytes | None = None, mtime_field: bytes | None = None,
               mode: int = 0o644) -> bytes:
    """One ustar header block written by hand, for what tarfile will not write."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"%07o\0" % mode
    block[108:124] = b"0000000\0" * 2
    block[124:136] = size_field or b"%011o\0" % size
    block[136:148] = mtime_field or b"%011o\0" % MTIME
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157 : 157 + len(linkname)] = linkname
    block[257:265] = b"ustar\x0000"
    return with_checksum(block)


def with_checksum(block: bytearray | bytes) -> bytes:
    """The header block with its checksum field recomputed."""
    block = bytearray(block)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pax_records(**records: str) -> bytes:
    out = b""
    for key, value in records.items():
        body = f" {key}={value}\n".encode()
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length += 1
        out += str(length).encode() + body
    return out


def pax_header(records: bytes, typeflag: bytes = b"x", name: bytes = b"././@PaxHeader") -> bytes:
    return raw_header(name, typeflag, len(records)) + pad(records)


def normal(name: str) -> str:
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def entry(member: Member) -> dict[str, Any] | None:
    """The manifest entry the packer would write for `member` (None for the root, specials)."""
    ti, data = member
    path = normal(ti.pax_headers.get("path", ti.name))
    kind = _TYPES.get(ti.type)
    if not path or kind is None:
        return None
    item: dict[str, Any] = {"path": path, "type": kind, "mode": ti.mode & 0o7777,
                            "origin": "test"}
    if kind == "file":
        item.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    elif kind == "symlink":
        item["target"] = ti.pax_headers.get("linkpath", ti.linkname)
    elif kind == "hardlink":
        item["target"] = normal(ti.pax_headers.get("linkpath", ti.linkname))
    return item


def file_entry(path: str, data: bytes = b"", mode: int = 0o644) -> dict[str, Any]:
    """The entry of a file written as a raw block, which `entries` cannot see into."""
    entry_ = entry(file(path, data, mode))
    assert entry_ is not None
    return entry_


@dataclass(frozen=True)
class Raw:
    """Raw tar blocks holding one member that the manifest lists with `entry`."""

    data: bytes
    entry: dict[str, Any]


Part = Member | bytes | Raw


def entries(members: Iterable[Part]) -> list[dict[str, Any]]:
    """The entries of `members`, in order; plain raw blocks have none."""
    found = []
    for member in members:
        if isinstance(member, Raw):
            found.append(member.entry)
        elif not isinstance(member, bytes) and (item := entry(member)) is not None:
            found.append(item)
    return found


def block(member: Part) -> bytes:
    if isinstance(member, Raw):
        return member.data
    return member if isinstance(member, bytes) else encode(member)


def manifest(entry_list: Iterable[dict[str, Any]] = (), **extra: Any) -> dict[str, Any]:
    """A manifest with these entries, matching totals and this host's platform."""
    items = list(entry_list)
    totals = {"entries": len(items), "bytes": sum(e.get("size", 0) for e in items)}
    return {"format": FORMAT, "entrypoint": ["/bin/sh"], "platform": dict(HOST_PLATFORM),
            "entries": items, "totals": totals, **extra}


def manifest_member(obj: Any = None) -> bytes:
    data = json.dumps(manifest() if obj is None else obj, sort_keys=True).encode()
    return encode(file(MANIFEST_PATH, data))


def tar(*members: Part, head: bytes | None = None, end: bytes = bytes(1024)) -> bytes:
    """A tar stream: the manifest, the members, the end marker.

    The manifest lists every member faithfully (raw blocks only when wrapped in Raw), as a
    hostile sender would write it too; `head` replaces it.
    """
    if head is None:
        head = manifest_member(manifest(entries(members)))
    return head + b"".join(block(member) for member in members) + end


def zst(raw: bytes, **kw: Any) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True, **kw).compress(raw)


def archive(*members: Part, **kw: Any) -> bytes:
    return zst(tar(*members, **kw))


def snapshot(root: Path, skip: Path) -> dict[str, tuple[Any, ...]]:
    """Everything below `root` except `skip`: modes, mtimes, link counts, contents, targets."""
    seen: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content: Any = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = Path(path).read_bytes()
            else:
                content = None
            seen[path] = (st.st_mode, st.st_mtime_ns, st.st_nlink, content)
    return seen
