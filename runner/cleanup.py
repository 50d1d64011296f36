"""Deleting a root: never across a mount, never through a link, whatever the program left."""

import errno
import os
import re
import stat
from dataclasses import dataclass

from runner.errors import RunError

O_PATHDIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_READDIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# mountinfo writes space, tab, newline and backslash in paths as \ooo.
OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


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
