"""Deleting a root: never across a mount, never through a link, whatever the program left."""

import os
import re

from runner.errors import RunError
from unpacker.dirfd import DIR_FLAGS as O_READDIR
from unpacker.dirfd import clear_directory, open_dir

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
    try:
        parent_fd = os.open(parent, O_READDIR)
        try:
            fd = open_dir(name, parent_fd)
            try:
                os.fchmod(fd, 0o700)
                clear_directory(fd)
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise RunError(f"cannot delete {root}: {e.strerror}{where}") from e
