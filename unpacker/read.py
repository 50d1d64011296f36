"""The tar layer: ustar and pax headers parsed from the decompressed stream, member by member."""

import enum
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import zstandard

from unpacker.errors import UnpackError
from unpacker.limits import Limits
from unpacker.names import PathError, check_symlink_target, normalize

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
CHUNK = 1 << 20
PAX_MAX = 64 * 1024
TRAILER_MAX = 16 << 20
MTIME_MAX = (1 << 32) - 1
# Decompressed bytes allowed per member on top of file data: headers, pax records, padding.
HEADER_ALLOWANCE = 4096

_PAX_MTIME = re.compile(rb"-?[0-9]{1,20}(\.[0-9]{0,20})?")


class Kind(enum.Enum):
    """The member types an rpack archive may hold (format.md section 2)."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"


_KINDS = {b"0": Kind.FILE, b"\0": Kind.FILE, b"1": Kind.HARDLINK, b"2": Kind.SYMLINK,
          b"5": Kind.DIR}
_REFUSED_TYPES = {
    b"3": "special file (character device) refused",
    b"4": "special file (block device) refused",
    b"6": "special file (fifo) refused",
    b"7": "contiguous file type refused",
    b"S": "sparse member refused",
    b"L": "gnu long name header refused",
    b"K": "gnu long link header refused",
    b"g": "global pax header refused",
}


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


@dataclass(frozen=True)
class Member:
    """One member as the extractor may trust it: type known, names checked and normalised.

    `name` is the name as the archive spells it (for messages), `path` its normalised form:
    components joined by "/", no ".", no empty component, "" for the root. `linkname` is a
    symlink's target verbatim, or a hardlink target's normalised path. `mode` holds the stored
    permission bits (07777), untrusted. `uid` and `gid` are the stored numeric ids, None when a
    pax record gave one that is not a number; the extractor ignores them unless told otherwise.
    """

    name: str
    path: str
    kind: Kind
    mode: int
    size: int
    mtime: int
    linkname: str
    uid: int | None
    gid: int | None

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")) if self.path else ()


@dataclass(frozen=True)
class _Header:
    name: bytes
    linkname: bytes
    typeflag: bytes
    mode: int
    size: int
    mtime: int
    uid: int
    gid: int


@dataclass
class _Pax:
    path: bytes | None = None
    linkpath: bytes | None = None
    size: int | None = None
    mtime: int | None = None
    ids: dict[str, int | None] = field(default_factory=dict)
    sparse: bool = False


class TarReader:
    """Yields the members of a tar stream, refusing everything rpack archives never contain.

    Headers are parsed here rather than by tarfile: Python 3.11.7's parser has quadratic pax
    parsing (CVE-2024-6232) and sizes its header reads by what the archive claims (gh-151497).
    Every read here is bounded: pax headers by PAX_MAX, data by CHUNK, the whole decompressed
    stream by the limits. After each member the caller reads its data with `data()` (or leaves
    it to be skipped); after the last one it calls `finish()`.
    """

    def __init__(self, stream: Readable, limits: Limits) -> None:
        self._stream = stream
        self._limits = limits
        self._current: str | None = None  # the member whose data is being read
        self._remaining = 0  # data bytes of the current member not yet read
        self._padding = 0
        self._members = 0
        self._total = 0
        self._offset = 0
        self._offset_max = (
            limits.max_total_bytes + limits.max_members * HEADER_ALLOWANCE + TRAILER_MAX
        )
        self._ended = False

    def __iter__(self) -> Iterator[Member]:
        while not self._ended:
            self._skip_data()
            member = self._next_member()
            if member is not None:
                yield member

    def data(self) -> Iterator[bytes]:
        """Yield the current member's data in chunks of at most CHUNK bytes."""
        while self._remaining:
            chunk = self._read(min(self._remaining, CHUNK), self._current)
            if not chunk:
                raise UnpackError("truncated archive (member data cut short)", self._current)
            self._remaining -= len(chunk)
            yield chunk

    def finish(self) -> None:
        """Check the end-of-archive marker and that only zero padding follows it, up to EOF."""
        assert self._ended, "finish() before the last member"
        block = self._read_exact(BLOCK)
        if len(block) < BLOCK:
            raise UnpackError("truncated archive (incomplete end-of-archive marker)")
        trailer = 0
        while block:
            if block.count(0) != len(block):
                raise UnpackError("data after end of archive")
            trailer += len(block)
            if trailer > TRAILER_MAX:
                raise UnpackError(f"more than {TRAILER_MAX} bytes of padding after end of archive")
            block = self._read(CHUNK)

    def _read(self, size: int, member: str | None = None) -> bytes:
        # Faults the zstd layer finds in the stream as a whole (truncation, trailing bytes)
        # come up through here unattributed; corrupt data is blamed on the member it is in.
        try:
            data = self._stream.read(size)
        except zstandard.ZstdError as exc:
            raise UnpackError(f"corrupt archive ({str(exc).lower()})", member) from exc
        self._offset += len(data)
        if self._offset > self._offset_max:
            raise UnpackError("decompressed archive exceeds what the size limit allows "
                              "(--max-total-size)")
        return data

    def _read_exact(self, size: int) -> bytes:
        data = self._read(size)
        while 0 < len(data) < size:
            more = self._read(size - len(data))
            if not more:
                break
            data += more
        return data

    def _skip_data(self) -> None:
        for _ in self.data():
            pass
        if self._padding:
            if len(self._read_exact(self._padding)) < self._padding:
                raise UnpackError("truncated archive (member padding cut short)")
            self._padding = 0

    def _next_member(self) -> Member | None:
        pax: _Pax | None = None
        while True:
            offset = self._offset
            block = self._read_exact(BLOCK)
            if len(block) < BLOCK:
                raise UnpackError("truncated archive (no end-of-archive marker)")
            if block == ZERO_BLOCK:
                if pax is not None:
                    raise UnpackError("pax header not followed by a member")
                self._ended = True
                return None
            header = _parse_header(block, offset)
            if header.typeflag != b"x":
                return self._member(header, pax or _Pax())
            if pax is not None:
                raise UnpackError("two pax headers in a row", _display(header.name))
            pax = self._read_pax(header)

    def _read_pax(self, header: _Header) -> _Pax:
        name = _display(header.name)
        if header.size < 0:
            raise UnpackError("negative size refused", name)
        if header.size > PAX_MAX:
            raise UnpackError(f"pax header of {header.size} bytes exceeds {PAX_MAX}", name)
        padded = header.size + -header.size % BLOCK
        data = self._read_exact(padded)
        if len(data) < padded:
            raise UnpackError("truncated archive (pax header cut short)", name)

        pax = _Pax()
        for key, value in _pax_records(data[: header.size], name).items():
            if key in ("path", "linkpath", "size") and not value:
                raise UnpackError(f"empty pax record {key!r} refused", name)
            if key.startswith("GNU.sparse."):
                pax.sparse = True
            elif key == "path":
                pax.path = value
            elif key == "linkpath":
                pax.linkpath = value
            elif key == "size":
                if not value.isdigit() or len(value) > 20:
                    raise UnpackError("invalid pax size", name)
                pax.size = int(value)
            elif key == "mtime" and _PAX_MTIME.fullmatch(value):
                pax.mtime = int(value.split(b".")[0])
            elif key in ("uid", "gid"):
                # Used only on request (numeric ownership), which refuses a None.
                valid = value.isdigit() and len(value) <= 20
                pax.ids[key] = int(value) if valid else None
            # Other records (uname, gname, atime, ctime, comment, xattrs, invalid mtimes)
            # select nothing the extractor creates, so they are ignored. hdrcharset too:
            # names must be valid UTF-8 whatever it says.
        return pax

    def _member(self, header: _Header, pax: _Pax) -> Member:
        raw_name = header.name if pax.path is None else pax.path
        name, utf8 = _decode(raw_name)
        self._members += 1
        if self._members > self._limits.max_members:
            raise UnpackError(f"too many members (limit {self._limits.max_members}, --max-members)",
                              name)

        kind = _KINDS.get(header.typeflag)
        if kind is None:
            flag = header.typeflag.decode("latin-1")
            raise UnpackError(_REFUSED_TYPES.get(header.typeflag, f"unknown type {flag!r}"), name)
        if pax.sparse:
            raise UnpackError("sparse member refused", name)
        size = header.size if pax.size is None else pax.size
        self._check_size(name, kind, size)

        try:
            path = normalize(name, utf8, kind is Kind.DIR, self._limits)
        except PathError as exc:
            raise UnpackError(str(exc), name) from None
        raw_link = header.linkname if pax.linkpath is None else pax.linkpath
        linkname = self._linkname(name, kind, raw_link)

        mtime = header.mtime if pax.mtime is None else pax.mtime
        self._current, self._remaining, self._padding = name, size, -size % BLOCK
        return Member(name, path, kind, header.mode, size, min(max(mtime, 0), MTIME_MAX),
                      linkname, pax.ids.get("uid", header.uid), pax.ids.get("gid", header.gid))

    def _check_size(self, name: str, kind: Kind, size: int) -> None:
        limits = self._limits
        if size < 0:
            raise UnpackError("negative size refused", name)
        if kind is not Kind.FILE:
            if size:
                raise UnpackError(f"{kind.value} member with data refused", name)
            return
        if size > limits.max_member_size:
            raise UnpackError(
                f"size {size} exceeds the size limit of {limits.max_member_size} bytes "
                "(--max-member-size)", name
            )
        self._total += size
        if self._total > limits.max_total_bytes:
            raise UnpackError(
                f"total size exceeds the size limit of {limits.max_total_bytes} bytes "
                "(--max-total-size)", name
            )

    def _linkname(self, name: str, kind: Kind, raw: bytes) -> str:
        if kind not in (Kind.SYMLINK, Kind.HARDLINK):
            return ""
        target, utf8 = _decode(raw)
        try:
            if kind is Kind.SYMLINK:
                check_symlink_target(target, utf8)
                return target
            return normalize(target, utf8, False, self._limits)
        except PathError as exc:
            if kind is Kind.SYMLINK:
                raise UnpackError(str(exc), name) from None
            raise UnpackError(f"hardlink target {target!r}: {exc}", name) from None


def _parse_header(block: bytes, offset: int) -> _Header:
    name = _cstring(block[0:100])
    try:
        if not _checksum_ok(block, _number(block[148:156])):
            raise ValueError("checksum")
        magic = block[257:265]
        if magic[:6] == b"ustar\0":
            prefix = _cstring(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        elif magic != b"ustar  \0":
            raise ValueError("magic")
        return _Header(name, _cstring(block[157:257]), block[156:157],
                       _number(block[100:108]) & 0o7777, _number(block[124:136]),
                       _number(block[136:148]), _number(block[108:116]), _number(block[116:124]))
    except ValueError:
        raise UnpackError(f"corrupt archive (invalid tar header at offset {offset})") from None


def _checksum_ok(block: bytes, stored: int) -> bool:
    """Check the header checksum over unsigned bytes or, as some old tars did, signed ones."""
    spaces = 8 * ord(" ")
    if stored == sum(block) - sum(block[148:156]) + spaces:
        return True
    signed: int = sum(struct.unpack("512b", block)) - sum(struct.unpack("8b", block[148:156]))
    return stored == signed + spaces


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (0x80 positive, 0xff negative)."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] == 0xFF:
        return int.from_bytes(field[1:], "big") - (1 << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip(b" ")
    if text.strip(b"01234567"):
        raise ValueError("not an octal number")
    return int(text, 8) if text else 0


def _pax_records(data: bytes, name: str) -> dict[str, bytes]:
    """Split `LEN key=value\\n` records in one linear pass; refuse anything malformed."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space]
        length = int(digits) if space > pos and digits.isdigit() else 0
        end = pos + length
        if length <= len(digits) + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise UnpackError("malformed pax header", name)
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals or not key:
            raise UnpackError("malformed pax header", name)
        text = key.decode("utf-8", "replace")
        if text in records:
            raise UnpackError(f"duplicate pax record {text!r}", name)
        records[text] = value
        pos = end
    return records


def _cstring(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _decode(raw: bytes) -> tuple[str, bool]:
    """Decode a name as UTF-8; undecodable bytes survive as surrogates, flagged False."""
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape"), False


def _display(raw: bytes) -> str:
    return _decode(raw)[0]
