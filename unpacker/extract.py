"""Streaming extraction of an rpack archive into an empty directory, by directory fds only."""

import errno
import json
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO

from unpacker.decompress import FrameChecker, open_stream
from unpacker.dirfd import DIR_FLAGS, clear_directory, open_dir
from unpacker.errors import UnpackError
from unpacker.format import FORMAT, MANIFEST_MAX_SIZE, MANIFEST_PATH
from unpacker.limits import Limits
from unpacker.read import Kind, Member, TarReader

logger = logging.getLogger(__name__)

FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
IMPLICIT_DIR_MODE = 0o755
SETID_BITS = stat.S_ISUID | stat.S_ISGID


def extract(
    source: BinaryIO, dest: str | os.PathLike[str], *, limits: Limits | None = None
) -> dict[str, Any]:
    """Extract the rpack archive read from `source` into `dest`; return its manifest.

    `source` is read front to back only (a pipe will do). `dest` must be an existing, empty
    directory. The first member must be the manifest (MANIFEST_PATH, a JSON object with the
    right "format"); it is extracted like any other file.

    Security contract: nothing is created outside `dest` and nothing outside it is followed,
    read or modified, whatever the archive holds. Every entry is created relative to an open
    directory fd reached with O_NOFOLLOW, files with O_EXCL. A model of what the archive has
    created refuses duplicates (a directory repeated is fine), members below a symlink or a
    file, and hard links to anything but an earlier regular-file member. Symlink targets are
    stored verbatim and never resolved on the host. Types and headers are checked in
    `unpacker.read`, names in `unpacker.names`, stream completeness in `unpacker.decompress`.
    Modes lose setuid and setgid; files keep owner rw, directories owner rwx; ownership is
    ignored.

    On any refusal or failure, everything created below `dest` is removed (`dest` stays,
    empty) and UnpackError is raised.
    """
    root_fd = _open_dest(dest)
    try:
        return _Extraction(root_fd, limits or Limits()).run(source)
    except BaseException as exc:
        _undo(root_fd, exc)
        raise
    finally:
        os.close(root_fd)


def _open_dest(dest: str | os.PathLike[str]) -> int:
    try:
        fd = os.open(dest, DIR_FLAGS)
    except OSError as exc:
        raise UnpackError(f"cannot open destination {os.fspath(dest)!r}: {_reason(exc)}") from exc
    try:
        if os.listdir(fd):
            raise UnpackError(f"destination {os.fspath(dest)!r} is not empty")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _undo(root_fd: int, exc: BaseException) -> None:
    """Remove the partial tree; if that fails too, say so in the error being raised."""
    try:
        clear_directory(root_fd)
    except Exception as cleanup_exc:
        logger.error("could not remove the partial extraction: %s", cleanup_exc)
        if isinstance(exc, UnpackError):
            raise UnpackError(
                f"{exc.reason}; could not remove the partial extraction ({_reason(cleanup_exc)})",
                exc.member,
            ) from exc


class _Tree:
    """What the archive has created so far, by normalised path: the model every check uses."""

    def __init__(self) -> None:
        self.kinds: dict[str, Kind] = {}  # hard links are recorded as the files they are
        self.dir_modes: dict[str, int] = {}

    def check(self, member: Member) -> int:
        """Refuse `member` if it clashes with the tree; return how many parents exist already."""
        parts = member.parts
        existing = 0
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            kind = self.kinds.get(prefix)
            if kind is None:
                break  # nor will any deeper prefix exist: parents are recorded first
            if kind is Kind.SYMLINK:
                raise UnpackError(f"would be created through symlink {prefix!r}", member.name)
            if kind is not Kind.DIR:
                raise UnpackError(f"would be created below file {prefix!r}", member.name)
            existing = depth

        kind = self.kinds.get(member.path)
        if kind is not None and not (kind is Kind.DIR and member.kind is Kind.DIR):
            raise UnpackError(f"duplicate member refused (already a {kind.value})", member.name)
        if member.kind is Kind.HARDLINK and self.kinds.get(member.linkname) is not Kind.FILE:
            raise UnpackError(
                f"hardlink target {member.linkname!r} is not an earlier regular file", member.name
            )
        return existing

    def add_dir(self, path: str, mode: int) -> None:
        self.kinds[path] = Kind.DIR
        self.dir_modes[path] = mode


class _DirCursor:
    """Directory fds along one path below the root, kept open while members share parents."""

    def __init__(self, root_fd: int) -> None:
        self._root = root_fd
        self._names: list[str] = []
        self._fds: list[int] = []

    def enter(self, parts: Sequence[str], create_from: int | None = None) -> int:
        """Return an fd of the directory at `parts`, making components from `create_from` on."""
        keep = 0
        for have, want in zip(self._names, parts, strict=False):
            if have != want:
                break
            keep += 1
        self._close_to(keep)

        for index in range(keep, len(parts)):
            parent = self._fds[-1] if self._fds else self._root
            if create_from is not None and index >= create_from:
                os.mkdir(parts[index], 0o700, dir_fd=parent)
            self._fds.append(open_dir(parts[index], parent))
            self._names.append(parts[index])
        return self._fds[-1] if self._fds else self._root

    def close(self) -> None:
        self._close_to(0)

    def _close_to(self, depth: int) -> None:
        while len(self._fds) > depth:
            os.close(self._fds.pop())
            self._names.pop()


class _Extraction:
    """One extraction: the tree model, the open directory fds and the counts for the log."""

    def __init__(self, root_fd: int, limits: Limits) -> None:
        self.limits = limits
        self.tree = _Tree()
        self.dirs = _DirCursor(root_fd)
        self.link_dirs = _DirCursor(root_fd)
        self.member: Member | None = None  # the member being created, for error messages
        self.created = 0
        self.setid_stripped = 0

    def run(self, source: BinaryIO) -> dict[str, Any]:
        checker = FrameChecker(source)
        try:
            with open_stream(checker) as stream:
                manifest = self._stream(TarReader(stream, self.limits))
            checker.check_complete()
            self._apply_dir_modes()
        except UnpackError:
            raise
        except Exception as exc:
            member = self.member.name if self.member else None
            raise UnpackError(_reason(exc), member) from exc
        finally:
            self.dirs.close()
            self.link_dirs.close()

        if self.setid_stripped:
            logger.warning("stripped setuid/setgid bits from %d members", self.setid_stripped)
        logger.info("extracted %d members from %d compressed bytes", self.created,
                    checker.compressed_bytes)
        return manifest

    def _stream(self, reader: TarReader) -> dict[str, Any]:
        members = iter(reader)
        first = next((member for member in members if member.path), None)
        manifest, data = self._manifest(reader, first)
        assert first is not None
        self._add(first, [data], None)
        entries = _entry_index(manifest)

        for member in members:
            # The one place every member streams past, with its manifest entry at hand.
            self._add(member, reader.data(), entries.get(member.path))
        reader.finish()
        return manifest

    def _manifest(self, reader: TarReader, first: Member | None) -> tuple[dict[str, Any], bytes]:
        if first is None:
            raise UnpackError("archive has no manifest")
        self.member = first
        if first.path != MANIFEST_PATH:
            raise UnpackError(f"first member must be {MANIFEST_PATH!r}", first.name)
        if first.kind is not Kind.FILE:
            raise UnpackError("manifest must be a regular file", first.name)
        if first.size > MANIFEST_MAX_SIZE:
            raise UnpackError(f"manifest larger than {MANIFEST_MAX_SIZE} bytes", first.name)
        data = b"".join(reader.data())
        return _parse_manifest(data, first.name), data

    def _add(self, member: Member, data: Iterable[bytes], entry: dict[str, Any] | None) -> None:
        """Create `member` below the root, its data read from `data` as it streams past.

        `entry` is the manifest's record of the member, or None: the seam where manifest
        verification (type, mode, size, target, sha256 of `data`) plugs in.
        """
        self.member = member
        if not member.path:
            self.member = None
            return  # a "./" entry names the root itself: nothing to create
        existing = self.tree.check(member)
        parts = member.parts
        parent = self.dirs.enter(parts[:-1], create_from=existing)
        for depth in range(existing + 1, len(parts)):
            self.tree.add_dir("/".join(parts[:depth]), IMPLICIT_DIR_MODE)

        leaf = parts[-1]
        if member.kind is Kind.DIR:
            if member.path not in self.tree.kinds:
                os.mkdir(leaf, 0o700, dir_fd=parent)
            self.tree.add_dir(member.path, self._mode(member))
        elif member.kind is Kind.FILE:
            self._write_file(parent, leaf, member, data)
        elif member.kind is Kind.SYMLINK:
            os.symlink(member.linkname, leaf, dir_fd=parent)
            self.tree.kinds[member.path] = Kind.SYMLINK
        else:
            target = member.linkname.split("/")
            source_dir = self.link_dirs.enter(target[:-1])
            os.link(target[-1], leaf, src_dir_fd=source_dir, dst_dir_fd=parent,
                    follow_symlinks=False)
            self.tree.kinds[member.path] = Kind.FILE
        self.created += 1
        self.member = None

    def _write_file(self, parent: int, leaf: str, member: Member, data: Iterable[bytes]) -> None:
        fd = os.open(leaf, FILE_FLAGS, 0o600, dir_fd=parent)
        self.tree.kinds[member.path] = Kind.FILE
        try:
            for chunk in data:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fchmod(fd, self._mode(member))
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)

    def _mode(self, member: Member) -> int:
        """The mode to apply: no setuid/setgid, owner rw (files) or rwx (directories)."""
        if member.mode & SETID_BITS:
            self.setid_stripped += 1
        if member.kind is Kind.DIR:
            return member.mode & 0o1777 | 0o700
        return member.mode & 0o777 | 0o600

    def _apply_dir_modes(self) -> None:
        # Deepest first, each through a fresh O_NOFOLLOW walk: no mode ever lands on a link.
        for path in sorted(self.tree.dir_modes, key=lambda path: (-path.count("/"), path)):
            os.fchmod(self.dirs.enter(path.split("/")), self.tree.dir_modes[path])


def _parse_manifest(data: bytes, name: str) -> dict[str, Any]:
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
        manifest = json.loads(data.decode(), object_pairs_hook=unique, parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:
        raise UnpackError(f"invalid manifest ({str(exc).lower()[:200]})", name) from None
    if not isinstance(manifest, dict):
        raise UnpackError("invalid manifest (not a json object)", name)
    if manifest.get("format") != FORMAT:
        shown = repr(manifest.get("format"))[:40]
        raise UnpackError(f"unsupported archive format {shown} (expected {FORMAT!r})", name)
    return manifest


def _entry_index(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries = manifest.get("entries")
    if not isinstance(entries, list):
        return {}
    return {
        entry["path"]: entry
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("path"), str)
    }


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.errno == errno.EEXIST:
            return "name collision with an existing entry"
        return (exc.strerror or str(exc)).lower()
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"unexpected {type(exc).__name__}: {exc}"
