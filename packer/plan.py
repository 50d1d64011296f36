"""The members of the archive: where each host file sits in the root, and why."""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from dataclasses import dataclass

from unpacker.limits import Limits
from unpacker.names import PathError, check_symlink_target, normalize

from .errors import PackError

logger = logging.getLogger(__name__)

MAX_HOPS = 40   # the kernel's limit on symbolic links followed in one lookup
_LIMITS = Limits()


@dataclass
class Member:
    """One tar member: a directory, a file, a symbolic link or a hard link."""

    path: str                   # inside the root, relative, in its real directory's spelling
    type: str                   # "dir", "file", "symlink" or "hardlink"
    mode: int
    mtime: int | None = None    # None: generated, takes the archive's own time
    source: str | None = None   # the host file read, for files
    data: bytes | None = None   # the content, for generated files
    target: str = ""            # the link target, for links
    size: int = 0
    origin: str = ""
    file_id: tuple[int, int] | None = None


class Plan:
    """Collects members as the host paths of a program's files are placed in the root."""

    def __init__(self, excludes: list[str] | None = None) -> None:
        self.members: dict[str, Member] = {}
        self.excludes = excludes or []

    def excluded(self, path: str) -> bool:
        absolute = "/" + path.lstrip("/")
        return any(fnmatch.fnmatchcase(absolute, glob) for glob in self.excludes)

    def add_object(self, path: str, origin: str) -> str | None:
        """Place a library or the loader: its directories as on the host, the name dereferenced.

        Returns the member's path, or None when it is excluded.
        """
        parent = self.directory(os.path.dirname(path), origin)
        member = _join(parent, os.path.basename(path))
        if self.excluded(member) or self.excluded(path):
            return None
        self._file(member, os.path.realpath(path), origin)
        return member

    def add_program(self, path: str, origin: str) -> str | None:
        """Place a program or an added file, keeping each symlink hop with the host's target."""
        parent = self.directory(os.path.dirname(path), origin)
        name = os.path.basename(path)
        for _ in range(MAX_HOPS):
            member = _join(parent, name)
            if self.excluded(member):
                return None
            host = "/" + member
            st = _lstat(host)
            if not stat.S_ISLNK(st.st_mode):
                if not stat.S_ISREG(st.st_mode):
                    raise PackError(f"{host!r} is not a regular file")
                self._file(member, host, origin)
                return member
            target = os.readlink(host)
            self._symlink(member, target, st, origin)
            following = target if target.startswith("/") else os.path.join("/" + parent, target)
            parent = self.directory(os.path.dirname(following), origin)
            name = os.path.basename(following)
        raise PackError(f"too many levels of symbolic links in {path!r}")

    def directory(self, path: str, origin: str, hops: int = 0) -> str:
        """Place every component of the host directory `path`; return its real spelling."""
        if hops > MAX_HOPS:
            raise PackError(f"too many levels of symbolic links in {path!r}")
        real = ""
        for component in path.split("/"):
            if component in ("", "."):
                continue
            if component == "..":
                real = os.path.dirname(real)
                continue
            member = _join(real, component)
            st = _lstat("/" + member)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink("/" + member)
                self._symlink(member, target, st, origin)
                following = target if target.startswith("/") else os.path.join("/" + real, target)
                real = self.directory(following, origin, hops + 1)
            elif stat.S_ISDIR(st.st_mode):
                self._dir(member, st, origin)
                real = member
            else:
                raise PackError(f"'/{member}' is not a directory")
        return real

    def add_tree(self, path: str, origin: str) -> list[str]:
        """Place a file or a whole tree as `tar c` does: a symlink inside the tree is stored
        with its own target and never followed. `path` itself is followed, each symlink hop
        kept with the host's target, as for a program.

        Returns the members of the regular files and symlinks placed, the symlinks on the
        way to `path` first.
        """
        known = len(self.members)
        if not stat.S_ISDIR(_stat(path).st_mode):
            st = _lstat(path)
            if not stat.S_ISLNK(st.st_mode) and not stat.S_ISREG(st.st_mode):
                raise PackError(f"{path!r} is not a regular file or a directory")
            member = self.add_program(path, origin)
            return self._new_symlinks(known) + ([member] if member else [])
        top = self.directory(path, origin)
        placed = self._new_symlinks(known)
        for parent, dirs, names in os.walk("/" + top, onerror=_walk_error):
            real_parent = parent[1:]
            if self.excluded(real_parent):
                dirs[:] = []
                continue
            self._dir(real_parent, _lstat(parent), origin)
            # os.walk lists a symlink to a directory among `dirs` and does not descend into it.
            for name in sorted(dirs + names):
                member = _join(real_parent, name)
                host = "/" + member
                if self.excluded(member):
                    continue
                lst = _lstat(host)
                if stat.S_ISLNK(lst.st_mode):
                    self._symlink(member, os.readlink(host), lst, origin)
                elif stat.S_ISREG(lst.st_mode):
                    self._file(member, host, origin)
                elif stat.S_ISDIR(lst.st_mode):
                    continue
                else:
                    logger.warning("%s: not a regular file, left out", host)
                    continue
                placed.append(member)
        return placed

    def _new_symlinks(self, known: int) -> list[str]:
        """The symlink members placed since the plan held `known` members."""
        return [m for m in list(self.members)[known:] if self.members[m].type == "symlink"]

    def resolves(self, path: str, directory: bool = False) -> bool:
        """Whether `path` leads to a file (or a directory) of the planned root, following its
        symlinks."""
        pending = path.split("/")
        current = ""
        for _ in range(MAX_HOPS * 64):
            if not pending:
                member = self.members.get(current)
                if directory:
                    return current == "" or (member is not None and member.type == "dir")
                return member is not None and member.type in ("file", "hardlink")
            component = pending.pop(0)
            if component in ("", "."):
                continue
            if component == "..":
                current = os.path.dirname(current)
                continue
            member = self.members.get(_join(current, component))
            if member is None:
                return False
            if member.type == "symlink":
                if member.target.startswith("/"):
                    current = ""
                pending = member.target.split("/") + pending
            else:
                current = member.path
        return False

    def add_generated(self, path: str, data: bytes, origin: str, mode: int = 0o644) -> None:
        parent = os.path.dirname(path)
        if parent and parent not in self.members:
            self.add_generated_dir(parent, origin)
        self.members[path] = Member(path, "file", mode, data=data, size=len(data), origin=origin)

    def add_generated_dir(self, path: str, origin: str, mode: int = 0o755) -> None:
        if path in self.members:
            return
        parent = os.path.dirname(path)
        if parent:
            self.add_generated_dir(parent, origin)
        self.members[path] = Member(path, "dir", mode, origin=origin)

    def _file(self, member: str, source: str, origin: str) -> None:
        if member in self.members:
            return
        _check_name(member, is_dir=False)
        try:
            st = os.stat(source)
        except OSError as e:
            raise PackError(f"cannot read {source!r}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise PackError(f"{source!r} is not a regular file")
        logger.debug("file %s <- %s (%s)", member, source, origin)
        self.members[member] = Member(member, "file", stat.S_IMODE(st.st_mode), int(st.st_mtime),
                                      source, size=st.st_size, origin=origin,
                                      file_id=(st.st_dev, st.st_ino))

    def _symlink(self, member: str, target: str, st: os.stat_result, origin: str) -> None:
        if member not in self.members:
            _check_name(member, is_dir=False, target=target)
            self.members[member] = Member(member, "symlink", 0o777, int(st.st_mtime),
                                          target=target, origin=origin)

    def _dir(self, member: str, st: os.stat_result, origin: str) -> None:
        if member and member not in self.members:
            _check_name(member, is_dir=True)
            self.members[member] = Member(member, "dir", stat.S_IMODE(st.st_mode),
                                          int(st.st_mtime), origin=origin)

    def finish(self, epoch: int | None) -> list[Member]:
        """The members in archive order, hard links for repeated host files, times clamped."""
        members = sorted(self.members.values(), key=lambda m: m.path.encode())
        newest = max((m.mtime for m in members if m.mtime is not None), default=0)
        when = epoch if epoch is not None else newest
        first: dict[tuple[int, int], str] = {}
        for m in members:
            # Times before 1970 would need a pax record; the format stores none.
            m.mtime = when if m.mtime is None else max(0, min(m.mtime, when))
            if m.type == "file" and m.file_id is not None:
                if m.file_id in first:
                    m.type, m.target, m.size = "hardlink", first[m.file_id], 0
                else:
                    first[m.file_id] = m.path
        return members


def _check_name(member: str, is_dir: bool, target: str | None = None) -> None:
    """Refuse a name the archive's readers would refuse (the reader's own rules)."""
    try:
        normalize(member, _is_utf8(member), is_dir, _LIMITS)
        if target is not None:
            check_symlink_target(target, _is_utf8(target))
    except PathError as e:
        # repr() escapes control characters: the name reaches a terminal in one line.
        shown = member.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise PackError(f"cannot pack {'/' + shown!r}: {e}",
                        hint="leave it out with --exclude") from None


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _walk_error(error: OSError) -> None:
    raise PackError(f"cannot read {error.filename!r}: {error.strerror}")


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise PackError(f"cannot read {path!r}: {e.strerror}") from None


def _lstat(path: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as e:
        raise PackError(f"cannot read {path!r}: {e.strerror}") from None
