"""Private temporary roots under one base per user: locked while in use, swept once stale."""

import errno
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from runner.cleanup import remove_tree
from runner.errors import RunError
from unpacker.dirfd import DIR_FLAGS as O_READDIR

log = logging.getLogger(__name__)

# Roots of runs that may be swept once their lock is free; --keep roots are never swept.
RUN_PREFIX = "run-"
KEEP_PREFIX = "keep-"


@contextmanager
def workspace(tmpdir: str | None = None, keep: bool = False) -> Iterator[str]:
    """Yield a fresh, empty, private directory for one run's root; delete it afterwards.

    It is made in the base (tmpdir or $TMPDIR or /tmp)/rpack-<uid>, which must be a
    directory of ours, mode 0700, on a filesystem that allows exec. The directory holds an
    exclusive flock(2) for as long as this process, or a child that inherited the
    descriptor, lives; a later workspace() in the same base sweeps roots whose lock is free,
    that is roots left by a runner that was killed. With keep the root is named keep-*, never
    swept and never deleted. Deletion refuses to start while anything is mounted at or under
    the root, never follows a symlink, and copes with unwritable and very deep directories.
    A refusal or failure raises RunError.
    """
    base_fd, base = open_base(tmpdir or os.environ.get("TMPDIR") or "/tmp")
    try:
        sweep(base_fd, base)
        root, lock = create(base_fd, base, KEEP_PREFIX if keep else RUN_PREFIX)
    finally:
        os.close(base_fd)
    log.debug("workspace %s", root)

    try:
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
    finally:
        os.close(lock)


def open_base(parent: str) -> tuple[int, str]:
    """Create or check parent/rpack-<uid>: a real directory of ours, mode 0700, exec allowed."""
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
        st = os.fstat(fd)
        if st.st_uid != uid:
            raise RunError(f"refusing to use {base}: it belongs to uid {st.st_uid}",
                           hint="someone may be preparing an attack; choose --tmpdir")
        os.fchmod(fd, 0o700)
        # The root is bind-mounted with the base's flags, so a program could not start;
        # better said now than after unpacking.
        if os.fstatvfs(fd).f_flag & os.ST_NOEXEC:
            raise RunError(f"the temporary directory {parent} is on a noexec filesystem, "
                           "where no program can run",
                           hint="choose another place with --tmpdir or TMPDIR")
    except BaseException:
        os.close(fd)
        raise
    return fd, base


def create(base_fd: int, base: str, prefix: str) -> tuple[str, int]:
    """Make a new root in base and lock it; return its path and the lock's descriptor."""
    # Sweepers lock the base exclusively, so none sees the new root before its own lock.
    fcntl.flock(base_fd, fcntl.LOCK_SH)
    try:
        try:
            root = tempfile.mkdtemp(prefix=prefix, dir=base)
        except OSError as e:
            raise RunError(f"cannot create a directory in {base}: {e.strerror}") from e
        lock = os.open(root, O_READDIR)
        # The root becomes the program's /, which a program that drops to another uid must
        # still traverse; the base (0700) is what keeps other users out.
        os.fchmod(lock, 0o755)
        fcntl.flock(lock, fcntl.LOCK_EX)
    finally:
        fcntl.flock(base_fd, fcntl.LOCK_UN)
    return root, lock


def sweep(base_fd: int, base: str, prefixes: tuple[str, ...] = (RUN_PREFIX,)) -> None:
    """Delete the directories in base named with prefixes that no live runner holds.

    They were left by a runner that was killed: roots of runs, and the cache's unfinished
    builds and deletions (runner.cache).
    """
    try:
        fcntl.flock(base_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another runner is sweeping or creating; the next run sweeps
    try:
        stale = [(name, lock) for name in sorted(os.listdir(base_fd))
                 if name.startswith(prefixes) and (lock := take_lock(base_fd, name)) >= 0]
    finally:
        fcntl.flock(base_fd, fcntl.LOCK_UN)

    # Deleted while still locked, so that no other sweeper starts on the same root.
    for name, lock in stale:
        try:
            remove_tree(os.path.join(base, name))
            log.info("removed %s, left behind by a run that was killed", name)
        except RunError as e:
            log.warning("%s", e)
        finally:
            os.close(lock)


def take_lock(base_fd: int, name: str) -> int:
    """The locked descriptor of base/name, or -1 if a live runner holds it."""
    try:
        fd = os.open(name, O_READDIR, dir_fd=base_fd)
    except OSError:
        return -1  # gone meanwhile, or not a directory: not ours to delete
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd
