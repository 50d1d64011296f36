"""Directory-fd helpers: opening without following links, and emptying a tree without recursion."""

import errno
import os

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(name: str, parent: int) -> int:
    """Open the directory `name` below the directory fd `parent`; a symlink there is refused."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except PermissionError:
        # No owner read: a umask that masked it at mkdir, or a mode the tree's owner set.
        # fchmodat without following refuses a symlink, so this never lands on a link.
        os.chmod(name, 0o700, dir_fd=parent, follow_symlinks=False)
        return os.open(name, DIR_FLAGS, dir_fd=parent)


def clear_directory(root_fd: int) -> None:
    """Remove everything below the directory `root_fd`, leaving the directory itself.

    Iterative, with one fd open below the root at a time: it descends by name with O_NOFOLLOW
    and climbs back through "..", checking that it lands on the directory it left, so neither
    a deep tree nor a symlink can lead it astray. Symlinks are unlinked, never followed and
    never chmod-ed. Each directory is made owner rwx before its entries are removed. It
    refuses to cross into another filesystem.
    """
    root_dev = os.fstat(root_fd).st_dev
    stack: list[tuple[str, tuple[int, int], list[str]]] = []  # name, parent's id, its todo
    fd = os.dup(root_fd)
    try:
        ident = _identity(fd)
        todo = _unlink_entries(fd)
        while True:
            if todo:
                name = todo.pop()
                child = _open_for_removal(fd, name, root_dev)
                if child is None:
                    continue
                stack.append((name, ident, todo))
                os.close(fd)
                fd = child
                ident = _identity(fd)
                todo = _unlink_entries(fd)
                continue
            if not stack:
                return
            name, ident, todo = stack.pop()
            parent = os.open("..", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            if _identity(fd) != ident:
                raise OSError(errno.ESTALE, "directory moved during removal", name)
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _unlink_entries(fd: int) -> list[str]:
    """Unlink every non-directory in the directory `fd`; return the subdirectories' names."""
    with os.scandir(fd) as it:
        entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in it]
    for name, is_dir in entries:
        if not is_dir:
            os.unlink(name, dir_fd=fd)
    return [name for name, is_dir in entries if is_dir]


def _open_for_removal(parent: int, name: str, root_dev: int) -> int | None:
    """Open the subdirectory `name` and make it owner rwx; None if it was not one after all."""
    try:
        fd = open_dir(name, parent)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        os.unlink(name, dir_fd=parent)
        return None
    if os.fstat(fd).st_dev != root_dev:
        os.close(fd)
        raise OSError(errno.EXDEV, "refusing to remove across filesystems", name)
    os.fchmod(fd, 0o700)
    return fd
