"""A cached root's stamp: every entry's lstat as unpacked, to tell later whether it still is."""

import os
import stat
from dataclasses import dataclass

from unpacker.dirfd import DIR_FLAGS

# What is recorded of each entry. The inode change time moves on every write, truncation,
# chmod, chown, link or rename, and no utime(2) can set it back, so together with the inode
# number it notices any change made through the filesystem, even one that kept size and mtime.
FIELDS = ("st_mode", "st_size", "st_mtime_ns", "st_ctime_ns", "st_ino")


@dataclass(frozen=True)
class Stamp:
    """Each path below a root ("" is the root itself) and its FIELDS; the blocks it takes."""

    records: dict[str, list[int]]
    disk_bytes: int

    def difference(self, other: "Stamp") -> str | None:
        """What differs in other, or None: a path gone, else one new, else one changed.

        A path gone or new also changes its directory; it is the more telling of the two.
        """
        mine, theirs = self.records, other.records
        if mine == theirs:
            return None
        if gone := mine.keys() - theirs.keys():
            return f"/{min(gone)} is missing"
        if new := theirs.keys() - mine.keys():
            return f"/{min(new)} appeared"
        return f"/{min(path for path in mine if mine[path] != theirs[path])} changed"


def take(root_fd: int) -> Stamp:
    """Stamp the tree below the directory root_fd, walking by descriptors, following no link.

    OSError if part of it cannot be read. The walk holds one descriptor per level open.
    """
    records = {"": record(os.fstat(root_fd))}
    blocks: dict[tuple[int, int], int] = {}
    walk(root_fd, "", records, blocks)
    return Stamp(records, 512 * sum(blocks.values()))


def record(st: os.stat_result) -> list[int]:
    return [getattr(st, name) for name in FIELDS]


def walk(fd: int, path: str, records: dict[str, list[int]],
         blocks: dict[tuple[int, int], int]) -> None:
    with os.scandir(fd) as it:
        entries = [(entry.name, entry.stat(follow_symlinks=False)) for entry in it]
    for name, st in entries:
        child_path = f"{path}/{name}" if path else name
        records[child_path] = record(st)
        # Hard links share their blocks.
        blocks[(st.st_dev, st.st_ino)] = st.st_blocks
        if stat.S_ISDIR(st.st_mode):
            child = os.open(name, DIR_FLAGS, dir_fd=fd)
            try:
                walk(child, child_path, records, blocks)
            finally:
                os.close(child)
