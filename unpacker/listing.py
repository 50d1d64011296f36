"""Listing an archive's members as they stream past: `tar -tv` lines, or JSON objects."""

import hashlib
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from unpacker.limits import Limits
from unpacker.read import Kind
from unpacker.stream import ArchiveReader

_TYPE_CHARS = {Kind.FILE: "-", Kind.DIR: "d", Kind.SYMLINK: "l", Kind.HARDLINK: "h"}


@dataclass(frozen=True)
class Listed:
    """One member as a listing shows it: the stored attributes, untouched by any neutralising.

    `name` is spelled as in the archive, `path` normalised. `sha256` (files) and `origin` come
    from the member's manifest entry, which the data is checked against as it streams past;
    for the manifest itself the sha256 is computed.
    """

    name: str
    path: str
    kind: Kind
    mode: int
    size: int
    mtime: int
    uid: int | None
    gid: int | None
    target: str | None
    sha256: str | None
    origin: str | None

    def as_json(self) -> dict[str, Any]:
        """The member as `rpack list --json` prints it, with the manifest's field names."""
        obj: dict[str, Any] = {"path": self.path, "type": self.kind.value, "mode": self.mode}
        if self.kind is Kind.FILE:
            obj.update(size=self.size, sha256=self.sha256)
        if self.target is not None:
            obj["target"] = self.target
        obj.update(mtime=self.mtime, uid=self.uid, gid=self.gid)
        if self.origin is not None:
            obj["origin"] = self.origin
        return obj


def list_members(source: BinaryIO, *, limits: Limits | None = None) -> Iterator[Listed]:
    """Yield the members of the archive read from `source`, the manifest first.

    Every check of `verify` runs as the members stream past (the platform excepted: a listing
    of another machine's archive is fine), so a fault raises UnpackError part way through,
    after the members before it were yielded.
    """
    for item in ArchiveReader(source, limits, check_platform=False):
        member, entry = item.member, item.entry
        if entry is None:
            sha256: str | None = hashlib.sha256(b"".join(item.data)).hexdigest()
            origin = None
        else:
            sha256, origin = entry.sha256, entry.origin
        target = member.linkname if member.kind in (Kind.SYMLINK, Kind.HARDLINK) else None
        yield Listed(member.name, member.path, member.kind, member.mode, member.size,
                     member.mtime, member.uid, member.gid, target, sha256, origin)


class TarLines:
    """Formats members as GNU tar's `-tv` does, widening the owner and size column as it goes."""

    def __init__(self) -> None:
        self._width = 19  # GNU tar's initial width of "uid/gid size"

    def line(self, listed: Listed) -> str:
        modes = _TYPE_CHARS[listed.kind] + stat.filemode(listed.mode)[1:]
        owner = f"{_id(listed.uid)}/{_id(listed.gid)}"
        size = str(listed.size)
        pad = len(owner) + 1 + len(size)
        self._width = max(self._width, pad)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(listed.mtime))
        size = size.rjust(self._width - pad + len(size))
        line = f"{modes} {owner} {size} {when} {_quote(listed.name)}"
        if listed.kind is Kind.SYMLINK:
            line += f" -> {_quote(listed.target or '')}"
        elif listed.kind is Kind.HARDLINK:
            line += f" link to {_quote(listed.target or '')}"
        return line


def _id(value: int | None) -> str:
    return "?" if value is None else str(value)


def _quote(name: str) -> str:
    # Names hold no control characters (they are refused); a backslash is tar's escape.
    return name.replace("\\", "\\\\")
