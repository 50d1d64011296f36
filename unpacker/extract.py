"""Streaming extraction of an rpack archive into an empty directory, by directory fds only."""

import contextlib
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO

from unpacker.dirfd import DIR_FLAGS, clear_directory, open_dir
from unpacker.errors import UnpackError, reason
from unpacker.limits import Limits
from unpacker.read import Kind, Member
from unpacker.stream import ArchiveReader, Item
from unpacker.verify import Summary

logger = logging.getLogger(__name__)

FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
IMPLICIT_DIR_MODE = 0o755
SETID_BITS = stat.S_ISUID | stat.S_ISGID
ID_MAX = (1 << 32) - 1  # (uid_t) -1 is no id


def extract(
    source: BinaryIO,
    dest: str | os.PathLike[str],
    *,
    limits: Limits | None = None,
    trust_setuid: bool = False,
    numeric_owner: bool = False,
    check_platform: bool = True,
) -> dict[str, Any]:
    """Extract the rpack archive read from `source` into `dest`; return its manifest.

    `source` is read front to back only (a pipe will do). `dest` must be an existing, empty
    directory. Every check of `unpacker.stream.ArchiveReader` applies: the manifest first (it
    is extracted like any other file), the platform against this host before anything else is
    created (unless `check_platform` is False), each member against its manifest entry, the
    sha256 of each file as it is written, every entry seen by the end.

    Security contract: nothing is created outside `dest` and nothing outside it is followed,
    read or modified, whatever the archive holds. Every entry is created relative to an open
    directory fd reached with O_NOFOLLOW, files with O_EXCL. A model of what the archive has
    created refuses duplicates (a directory repeated is fine), members below a symlink or a
    file, and hard links to anything but an earlier regular-file member. Symlink targets are
    stored verbatim and never resolved on the host. Modes lose setuid and setgid unless
    `trust_setuid`; files keep owner rw, directories owner rwx, applied to directories at the
    end. Ownership is ignored unless `numeric_owner` (root only), which applies the stored
    numeric ids and never looks up a name.

    On any refusal or failure, everything created below `dest` is removed (`dest` stays,
    empty) and UnpackError is raised.
    """
    return extract_summary(source, dest, limits=limits, trust_setuid=trust_setuid,
                           numeric_owner=numeric_owner, check_platform=check_platform).manifest


def extract_summary(
    source: BinaryIO,
    dest: str | os.PathLike[str],
    *,
    limits: Limits | None = None,
    trust_setuid: bool = False,
    numeric_owner: bool = False,
    check_platform: bool = True,
) -> Summary:
    """`extract`, returning what `verify` would: the manifest, the identity and the sizes."""
    if numeric_owner and os.geteuid() != 0:
        raise UnpackError("numeric ownership needs root")
    root_fd = _open_dest(dest)
    try:
        extraction = _Extraction(root_fd, limits or Limits(), trust_setuid, numeric_owner)
        return extraction.run(source, check_platform)
    except BaseException as exc:
        _undo(root_fd, exc)
        raise
    finally:
        os.close(root_fd)


def extract_to(
    source: BinaryIO,
    dest: str | os.PathLike[str],
    *,
    limits: Limits | None = None,
    trust_setuid: bool = False,
    numeric_owner: bool = False,
) -> dict[str, Any]:
    """`extract` into `dest`, which is created (mode 0700) if it does not exist.

    A `dest` created here is removed again when the extraction fails; an existing one must be
    empty, and is left empty on failure.
    """

    def run() -> dict[str, Any]:
        return extract(source, dest, limits=limits, trust_setuid=trust_setuid,
                       numeric_owner=numeric_owner)

    try:
        os.mkdir(dest, 0o700)
    except FileExistsError:
        return run()
    except OSError as exc:
        raise UnpackError(f"cannot create destination {os.fspath(dest)!r}: {reason(exc)}") from exc
    try:
        return run()
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(dest)
        raise


def _open_dest(dest: str | os.PathLike[str]) -> int:
    try:
        fd = os.open(dest, DIR_FLAGS)
    except OSError as exc:
        raise UnpackError(f"cannot open destination {os.fspath(dest)!r}: {reason(exc)}") from exc
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
                f"{exc.reason}; could not remove the partial extraction ({reason(cleanup_exc)})",
                exc.member,
            ) from exc


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
    """One extraction: the open directory fds, the modes to apply last, counts for the log."""

    def __init__(self, root_fd: int, limits: Limits, trust_setuid: bool,
                 numeric_owner: bool) -> None:
        self.root_fd = root_fd
        self.limits = limits
        self.trust_setuid = trust_setuid
        self.numeric_owner = numeric_owner
        self.dir_modes: dict[str, int] = {}
        self.dirs = _DirCursor(root_fd)
        self.link_dirs = _DirCursor(root_fd)
        self.member: Member | None = None  # the member being created, for error messages
        self.setid_stripped = 0

    def run(self, source: BinaryIO, check_platform: bool) -> Summary:
        reader = ArchiveReader(source, self.limits, check_platform=check_platform)
        try:
            for item in reader:
                if item.entry is None:
                    assert reader.manifest is not None
                    self._check_space(reader.manifest.file_bytes)
                self._add(item)
            self.member = None
            self._apply_dir_modes()
        except UnpackError:
            raise
        except Exception as exc:
            member = self.member.name if self.member else None
            raise UnpackError(reason(exc), member) from exc
        finally:
            self.dirs.close()
            self.link_dirs.close()

        if self.setid_stripped:
            logger.warning("stripped setuid/setgid bits from %d member%s", self.setid_stripped,
                           "" if self.setid_stripped == 1 else "s")
        logger.info("extracted %d members from %d compressed bytes", reader.members,
                    reader.compressed_bytes)
        assert reader.manifest is not None and reader.identity is not None
        return Summary(reader.manifest.data, reader.identity, reader.members,
                       reader.manifest.file_bytes, reader.tar_bytes, reader.compressed_bytes)

    def _check_space(self, needed: int) -> None:
        st = os.fstatvfs(self.root_fd)
        free = st.f_bavail * st.f_frsize
        if needed > free:
            raise UnpackError(f"not enough space: the archive's files take {needed} bytes, the "
                              f"destination has {free} bytes free")

    def _add(self, item: Item) -> None:
        """Create the item's member below the root, its data written as it streams past."""
        member = self.member = item.member
        parts = member.parts
        parent = self.dirs.enter(parts[:-1], create_from=item.parents)
        for depth in range(item.parents + 1, len(parts)):
            self.dir_modes["/".join(parts[:depth])] = IMPLICIT_DIR_MODE

        leaf = parts[-1]
        if member.kind is Kind.DIR:
            if not item.repeat:
                os.mkdir(leaf, 0o700, dir_fd=parent)
            self._chown(parent, leaf, member)
            self.dir_modes[member.path] = self._mode(member)
        elif member.kind is Kind.FILE:
            self._write_file(parent, leaf, member, item.data)
        elif member.kind is Kind.SYMLINK:
            os.symlink(member.linkname, leaf, dir_fd=parent)
            self._chown(parent, leaf, member)
        else:
            # The file member made the inode and gave it its owner.
            target = member.linkname.split("/")
            source_dir = self.link_dirs.enter(target[:-1])
            os.link(target[-1], leaf, src_dir_fd=source_dir, dst_dir_fd=parent,
                    follow_symlinks=False)
        self.member = None

    def _write_file(self, parent: int, leaf: str, member: Member, data: Iterable[bytes]) -> None:
        fd = os.open(leaf, FILE_FLAGS, 0o600, dir_fd=parent)
        try:
            for chunk in data:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            if self.numeric_owner:
                os.fchown(fd, *self._owner(member))  # before fchmod: chown clears setuid
            os.fchmod(fd, self._mode(member))
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)

    def _chown(self, parent: int, leaf: str, member: Member) -> None:
        if self.numeric_owner:
            os.chown(leaf, *self._owner(member), dir_fd=parent, follow_symlinks=False)

    def _owner(self, member: Member) -> tuple[int, int]:
        """The stored ids, refused unless each is a real id (-1 means "unchanged" to chown)."""
        for what, value in (("uid", member.uid), ("gid", member.gid)):
            if value is None:
                raise UnpackError(f"pax {what} record is not a number", member.name)
            if not 0 <= value < ID_MAX:
                raise UnpackError(f"{what} {value} out of range", member.name)
        assert member.uid is not None and member.gid is not None
        return member.uid, member.gid

    def _mode(self, member: Member) -> int:
        """The mode to apply: setuid/setgid only if trusted, owner rw (files) or rwx (dirs)."""
        if member.mode & SETID_BITS and not self.trust_setuid:
            self.setid_stripped += 1
        kept = SETID_BITS if self.trust_setuid else 0
        if member.kind is Kind.DIR:
            return member.mode & (0o1777 | kept) | 0o700
        return member.mode & (0o777 | kept) | 0o600

    def _apply_dir_modes(self) -> None:
        # Deepest first, each through a fresh O_NOFOLLOW walk: no mode ever lands on a link.
        for path in sorted(self.dir_modes, key=lambda path: (-path.count("/"), path)):
            os.fchmod(self.dirs.enter(path.split("/")), self.dir_modes[path])
