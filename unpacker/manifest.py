"""The manifest: its schema, and each member checked against its entry as it streams past."""

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeGuard

from unpacker.errors import UnpackError
from unpacker.format import FORMAT
from unpacker.read import Kind, Member

_SHA256 = re.compile("[0-9a-f]{64}")
# Control characters (C0, DEL, C1): in a string shown on a terminal they can move the cursor,
# retitle the window or clear the screen (security.md C22). No manifest string needs them.
# Lone surrogates, which JSON's \u escapes can make, are no text at all: printing one fails.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# JSON items (commas and opening brackets) a manifest may hold per entry its members allow:
# an entry is one object of at most seven keys, six commas in it and one in the list; the
# rest of the manifest needs a few dozen.
_ITEMS_PER_ENTRY, _ITEMS_BESIDES = 10, 4096
_KERNEL = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6}){0,3}")
_KINDS = {kind.value: kind for kind in Kind}


@dataclass(frozen=True, slots=True)
class Entry:
    """One record of the manifest's `entries`: what the member of that path must be.

    `size` is 0 and `sha256` None except for files; `target` is None except for links.
    """

    path: str
    kind: Kind
    mode: int
    size: int
    sha256: str | None
    target: str | None
    origin: str | None


@dataclass(frozen=True)
class Platform:
    """What a host must offer to run the archive's programs (format.md section 4)."""

    machine: str
    elf_class: int
    endian: str
    libc: str | None
    libc_version: str | None
    min_kernel: str | None


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest: the JSON object as stored, its entries and its platform, checked."""

    data: dict[str, Any]
    entries: list[Entry]
    platform: Platform

    @property
    def file_bytes(self) -> int:
        return sum(entry.size for entry in self.entries)


def parse_manifest(data: bytes, name: str, max_members: int) -> Manifest:
    """Parse and check the manifest member's bytes; refuse, naming `name`, what is not valid.

    Before parsing, its JSON items are counted, those in strings too: no more than
    `max_members` entries need, so that a small crafted manifest cannot make the parser build
    millions of objects. A manifest rpack writes needs about 7 an entry.
    """
    count = data.count(b",") + data.count(b"{") + data.count(b"[")
    if count > _ITEMS_PER_ENTRY * max_members + _ITEMS_BESIDES:
        raise UnpackError(f"invalid manifest ({count} json items, more than "
                          f"{max_members} entries need; see --max-members)", name)
    obj = _load(data, name)
    if obj.get("format") != FORMAT:
        shown = repr(obj.get("format"))[:40]
        raise UnpackError(f"unsupported archive format {shown} (expected {FORMAT!r})", name)
    try:
        # An entry's path and target are left to the member checks, which refuse such a name
        # more precisely; what else an entry says (its origin) is checked here.
        _check_text({k: v for k, v in obj.items() if k != "entries"}, "the manifest")
        entries_value = obj.get("entries")
        if isinstance(entries_value, list):
            _check_text([{k: v for k, v in e.items() if k not in ("path", "target")}
                         for e in entries_value if isinstance(e, dict)], "'entries'")
        entries = _entries(obj.get("entries"))
        platform = _platform(obj.get("platform"))
        _check_totals(obj.get("totals"), entries)
        _check_defaults(obj)
    except ValueError as exc:
        raise UnpackError(f"invalid manifest ({exc})", name) from None
    return Manifest(obj, entries, platform)


def _check_text(value: Any, where: str) -> None:
    """Refuse a control character or lone surrogate in any string of `value`, keys too."""
    if isinstance(value, str):
        if _CONTROL.search(value):
            raise ValueError(f"control character or lone surrogate in a string of {where}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, f"'{key[:40]}'" if where == "the manifest" else where)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, where)


def _check_defaults(obj: dict[str, Any]) -> None:
    """The run-time defaults, when present, must be what exec and chdir can take."""
    entrypoint = obj.get("entrypoint")
    if entrypoint is not None and (not isinstance(entrypoint, list) or not entrypoint
                                   or not all(isinstance(a, str) for a in entrypoint)
                                   or not entrypoint[0]):
        raise ValueError("'entrypoint' is not a non-empty list of strings")
    programs = obj.get("programs")
    if programs is not None and (not isinstance(programs, list)
                                 or not all(isinstance(p, str) for p in programs)):
        raise ValueError("'programs' is not a list of strings")
    env = obj.get("env")
    if env is not None:
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise ValueError("'env' is not an object of strings")
        if any(not key or "=" in key for key in env):
            raise ValueError("'env' has a name that is empty or holds '='")
    workdir = obj.get("workdir")
    if workdir is not None and (not isinstance(workdir, str) or not workdir.startswith("/")):
        raise ValueError("'workdir' is not an absolute path")


def _load(data: bytes, name: str) -> dict[str, Any]:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError(f"duplicate key {key!r}")
            obj[key] = value
        return obj

    def no_constant(text: str) -> None:
        raise ValueError(f"{text} is not json")

    try:
        obj = json.loads(data.decode(), object_pairs_hook=unique, parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:
        # Python's own advice for long numbers (set_int_max_str_digits) is not the user's.
        text = str(exc).lower().partition("; use sys.")[0]
        raise UnpackError(f"invalid manifest ({text[:200]})", name) from None
    if not isinstance(obj, dict):
        raise UnpackError("invalid manifest (not a json object)", name)
    return obj


def _entries(value: Any) -> list[Entry]:
    if not isinstance(value, list):
        raise ValueError("'entries' is not a list")
    return [_entry(index, item) for index, item in enumerate(value)]


def _entry(index: int, item: Any) -> Entry:
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        raise ValueError(f"entry {index} is not an object with a 'path'")
    path = item["path"]
    where = f"entry {path[:100]!r}"
    kind_name = item.get("type")
    kind = _KINDS.get(kind_name) if isinstance(kind_name, str) else None
    if kind is None:
        raise ValueError(f"{where}: unknown type {str(kind_name)[:20]!r}")
    mode = item.get("mode")
    if not _is_int(mode) or not 0 <= mode <= 0o7777:
        raise ValueError(f"{where}: 'mode' is not a number from 0 to 0o7777")

    size, sha256, target = 0, None, None
    if kind is Kind.FILE:
        stored_size, sha256 = item.get("size"), item.get("sha256")
        if not _is_int(stored_size) or stored_size < 0:
            raise ValueError(f"{where}: 'size' is not a number of bytes")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValueError(f"{where}: 'sha256' is not 64 lowercase hex digits")
        size = stored_size
    elif kind in (Kind.SYMLINK, Kind.HARDLINK):
        target = item.get("target")
        if not isinstance(target, str):
            raise ValueError(f"{where}: 'target' is not a string")
    origin = item.get("origin")
    return Entry(path, kind, mode, size, sha256, target,
                 origin if isinstance(origin, str) else None)


def _platform(value: Any) -> Platform:
    if not isinstance(value, dict):
        raise ValueError("'platform' is not an object")
    machine, elf_class, endian = value.get("machine"), value.get("elf_class"), value.get("endian")
    if not isinstance(machine, str) or not machine:
        raise ValueError("platform 'machine' is not a name")
    if elf_class not in (32, 64) or not _is_int(elf_class):
        raise ValueError("platform 'elf_class' is not 32 or 64")
    if endian not in ("little", "big"):
        raise ValueError("platform 'endian' is not 'little' or 'big'")
    kernel = value.get("min_kernel")
    if kernel is not None and (not isinstance(kernel, str) or not _KERNEL.fullmatch(kernel)):
        raise ValueError("platform 'min_kernel' is not a version like '3.2.0'")
    libc, libc_version = value.get("libc"), value.get("libc_version")
    return Platform(machine, elf_class, endian, libc if isinstance(libc, str) else None,
                    libc_version if isinstance(libc_version, str) else None, kernel)


def _check_totals(value: Any, entries: list[Entry]) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ValueError("'totals' is not an object")
    size = sum(entry.size for entry in entries)
    if value.get("entries") != len(entries) or value.get("bytes") != size:
        raise ValueError(f"'totals' do not match the entries ({len(entries)} entries, "
                         f"{size} bytes)")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class ManifestCheck:
    """Walks the manifest's entries in archive order as the members stream past.

    `match` refuses a member that is not the next entry, or whose type, mode (as stored, before
    any neutralising), size or link target differ from it; `data` passes a file's data on and
    refuses at its end if the sha256 differs; `finish` refuses entries never seen.
    """

    def __init__(self, manifest: Manifest) -> None:
        self._entries = manifest.entries
        self._next = 0
        self._paths: set[str] | None = None  # built on the first mismatch, for its message

    def match(self, member: Member) -> Entry:
        entries = self._entries
        if self._next >= len(entries) or entries[self._next].path != member.path:
            raise self._unexpected(member)
        entry = entries[self._next]
        self._next += 1

        differs = None
        if member.kind is not entry.kind:
            differs = f"type {member.kind.value} differs from the manifest's {entry.kind.value}"
        elif member.mode != entry.mode:
            differs = f"mode {member.mode:04o} differs from the manifest's {entry.mode:04o}"
        elif member.size != entry.size:
            differs = f"size {member.size} differs from the manifest's {entry.size}"
        elif entry.target is not None and member.linkname != entry.target:
            differs = (f"link target {member.linkname!r} differs from the manifest's "
                       f"{entry.target!r}")
        if differs:
            raise UnpackError(differs, member.name)
        return entry

    def data(self, member: Member, entry: Entry, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Yield `chunks` on; after the last one, refuse unless their sha256 is the entry's."""
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
            yield chunk
        if entry.sha256 is not None and digest.hexdigest() != entry.sha256:
            raise UnpackError(f"checksum mismatch (sha256 {digest.hexdigest()}, the manifest "
                              f"says {entry.sha256})", member.name)

    def finish(self) -> None:
        missing = self._entries[self._next :]
        if missing:
            count = f"{len(missing)} entries" if len(missing) > 1 else "1 entry"
            raise UnpackError(f"manifest lists {count} not present in the archive "
                              f"(the first is {missing[0].path!r})")

    def _unexpected(self, member: Member) -> UnpackError:
        if self._paths is None:
            self._paths = {entry.path for entry in self._entries}
        if member.path not in self._paths:
            return UnpackError("unexpected member (not in the manifest)", member.name)
        if self._next < len(self._entries):
            expected = f"{self._entries[self._next].path!r} comes next"
        else:
            expected = "all its entries were seen"
        return UnpackError(f"out of manifest order ({expected})", member.name)
