"""Private temporary roots under one base per user, deleted without crossing a mount."""

import errno
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from runner.sandbox import RunError

log = logging.getLogger(__name__)

O_PATHDIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_READDIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# mountinfo writes space, tab, newline and backslash in paths as \ooo.
OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


@contextmanager
def workspace(tmpdir: str | None = None, keep: bool = False) -> Iterator[str]:
    """Yield a fresh private directory for one run's root; delete it afterwards unless keep.

    It is made in (tmpdir or $TMPDIR or /tmp)/rpack-<uid>. Deletion refuses to start while
    anything is mounted at or under it, never follows a symlink, and copes with unwritable
    and very deep directories. A refusal or failure raises RunError.
    """
    base = make_base(tmpdir or os.environ.get("TMPDIR") or "/tmp")
    try:
        root = tempfile.mkdtemp(prefix="run-", dir=base)
    except OSError as e:
        raise RunError(f"cannot create a directory in {base}: {e.strerror}") from e
    log.debug("workspace %s", root)

    try:
        yield root
    except BaseException:
        # The first failure is the one to report; a failed cleanup is only logged.
        if not keep:
            try:
                remove_tree(root)
            except RunError as e:
                log.error("%s", e)
        raise
    if not keep:
        remove_tree(root)


def make_base(parent: str) -> str:
    """Create or check parent/rpack-<uid>: a real directory of ours, mode 0700."""
    uid = os.geteuid()
    base = os.path.join(parent, f"rpack-{uid}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise RunError(f"cannot create {base}: {e.strerror}",
                       hint="choose another place with --tmpdir") from e

    try:
        fd = os.open(base, O_READDIR)
    except OSError as e:
        what = "a symlink or not a directory" if e.errno in (errno.ELOOP, errno.ENOTDIR) else ""
        raise RunError(f"refusing to use {base}: {what or e.strerror}") from e
    try:
        owner = os.fstat(fd).st_uid
        if owner != uid:
            raise RunError(f"refusing to use {base}: it belongs to uid {owner}",
                           hint="someone may be preparing an attack; choose --tmpdir")
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return base


def mount_points() -> list[str]:
    """The mount points of this mount namespace, from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RunError(f"cannot read /proc/self/mountinfo to look for mounts: {e.strerror}") from e
    # The fifth field is the mount point.
    return [os.fsdecode(OCTAL_ESCAPE.sub(unescape, line.split(b" ")[4])) for line in lines]


def unescape(match: re.Match[bytes]) -> bytes:
    return bytes([int(match[1], 8)])


def remove_tree(root: str) -> None:
    """Delete root and everything in it; refuse, deleting nothing, if a mount is inside."""
    real = os.path.realpath(root)
    if not os.path.lexists(real):
        return
    # A bind mount has the same st_dev as its surroundings, so only the mount table tells.
    inside = [m for m in mount_points() if m == real or m.startswith(real.rstrip("/") + "/")]
    if inside:
        raise RunError(f"refusing to delete {root}: {inside[0]} is mounted inside it",
                       hint="unmount it, then delete the directory by hand")

    parent, name = os.path.split(real)
    parent_fd = os.open(parent, O_READDIR)
    try:
        delete(parent_fd, name, real)
    finally:
        os.close(parent_fd)


@dataclass
class Level:
    name: str
    ident: tuple[int, int]
    subdirs: list[str]


def delete(parent_fd: int, name: str, path: str) -> None:
    """Delete parent_fd/name depth first, without recursion and one directory open at a time."""
    stack: list[Level] = []
    fd = -1
    try:
        fd, st = open_dir(parent_fd, name, None)
        dev = st.st_dev
        stack.append(Level(name, (st.st_dev, st.st_ino), unlink_files(fd)))
        while stack:
            level = stack[-1]
            if level.subdirs:
                child = level.subdirs.pop()
                child_fd, st = open_dir(fd, child, dev)
                os.close(fd)
                fd = child_fd
                stack.append(Level(child, (st.st_dev, st.st_ino), unlink_files(fd)))
                continue

            stack.pop()
            up = climb(fd, stack[-1].ident) if stack else parent_fd
            os.close(fd)
            fd = up if stack else -1
            os.rmdir(level.name, dir_fd=up)
    except OSError as e:
        where = os.path.join(os.path.dirname(path), *[item.name for item in stack],
                             e.filename or "")
        raise RunError(f"cannot delete {where.rstrip('/')}: {e.strerror}") from e
    finally:
        if fd >= 0:
            os.close(fd)


def open_dir(dir_fd: int, name: str, dev: int | None) -> tuple[int, os.stat_result]:
    """Open a directory for deletion without following a link, making it writable if needed."""
    path_fd = os.open(name, O_PATHDIR, dir_fd=dir_fd)
    try:
        st = os.fstat(path_fd)
        if dev is not None and st.st_dev != dev:
            raise OSError(errno.EXDEV, "another filesystem is mounted there", name)
        if st.st_mode & 0o700 != 0o700:
            # Deleting entries needs write and search permission on the directory. The chmod
            # goes through the descriptor, so it can only ever reach this directory.
            os.chmod(f"/proc/self/fd/{path_fd}", stat.S_IMODE(st.st_mode) | 0o700)
        return os.open(".", O_READDIR, dir_fd=path_fd), st
    finally:
        os.close(path_fd)


def unlink_files(fd: int) -> list[str]:
    """Unlink everything in the directory but its subdirectories, and return their names."""
    with os.scandir(fd) as it:
        entries = list(it)
    subdirs = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            subdirs.append(entry.name)
        else:
            os.unlink(entry.name, dir_fd=fd)
    return subdirs


def climb(fd: int, ident: tuple[int, int]) -> int:
    """Open the parent of fd, checking it is still the directory we came down from."""
    up = os.open("..", O_READDIR, dir_fd=fd)
    st = os.fstat(up)
    if (st.st_dev, st.st_ino) != ident:
        os.close(up)
        raise OSError(errno.ESTALE, "the tree was moved while being deleted", "..")
    return up
