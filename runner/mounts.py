"""The sandbox's filesystem: the root bound nosuid,nodev, fresh /proc and /dev, binds, pivot."""

import contextlib
import errno
import logging
import os
import posixpath
import stat
from collections.abc import Callable
from dataclasses import dataclass

from runner import linux
from runner.errors import RunError

log = logging.getLogger(__name__)

PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"))

# Real root keeps only what a root in a chroot needs to own, change and serve its own files:
# no mounts, modules, raw I/O or new device nodes (SYS_ADMIN, SYS_MODULE, SYS_RAWIO, MKNOD),
# no chroot (the nested-chroot escape), no open_by_handle_at (DAC_READ_SEARCH reaches any
# inode of the root's filesystem, the "shocker" escape), no tracing, no host network, clock,
# audit or MAC setup, no raw packets on the shared network, no immutable files that cleanup
# could not delete, and no locking, priorities or limits beyond the host's. Unprivileged runs
# get the same set: their capabilities hold only inside their own user namespace, but there
# SYS_ADMIN would let the program remount or unmount what the sandbox set up.
KEPT_CAPABILITIES = frozenset({
    linux.CAP_CHOWN, linux.CAP_DAC_OVERRIDE, linux.CAP_FOWNER, linux.CAP_FSETID,
    linux.CAP_KILL, linux.CAP_SETGID, linux.CAP_SETUID, linux.CAP_SETPCAP,
    linux.CAP_NET_BIND_SERVICE, linux.CAP_AUDIT_WRITE, linux.CAP_SETFCAP,
})

# Flags a remount must keep: in a user namespace they are locked and a remount that drops one
# fails.
KEPT_FLAGS = {os.ST_RDONLY: linux.MS_RDONLY, os.ST_NOEXEC: linux.MS_NOEXEC,
              os.ST_NOATIME: linux.MS_NOATIME, os.ST_NODIRATIME: linux.MS_NODIRATIME,
              os.ST_RELATIME: linux.MS_RELATIME}

O_PATHDIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_PATHANY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Bind:
    """A host path the program may see: --bind SRC[:DST[:ro]]."""

    source: str  # absolute, on the host
    dest: str  # in the root, without the leading /
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> "Bind":
        """Parse SRC[:DST[:ro|rw]]; DST defaults to SRC. ValueError says what is wrong."""
        parts = text.split(":")
        if len(parts) > 3 or not parts[0]:
            raise ValueError(f"expected SRC[:DST[:ro]], got {text!r}")
        source = parts[0]
        dest = parts[1] if len(parts) > 1 and parts[1] else os.path.abspath(source)
        mode = parts[2] if len(parts) > 2 else "rw"
        if mode not in ("ro", "rw"):
            raise ValueError(f"the bind mode must be ro or rw, got {mode!r}")
        if not dest.startswith("/") or ".." in dest.split("/"):
            raise ValueError(f"the bind destination must be an absolute path without '..', "
                             f"got {dest!r}")
        dest = posixpath.normpath(dest)
        if dest in ("/", "//"):
            raise ValueError("cannot bind over the whole root")
        return cls(os.path.abspath(source), dest.lstrip("/"), mode == "ro")


@dataclass(frozen=True)
class Layers:
    """An overlay for the root: a cached root read-only below, the run's own writes above.

    upper and work are the run's, empty, on one filesystem; lower is never written to.
    """

    lower: str
    upper: str
    work: str


def enter_root(root: str, binds: list[Bind], userns: bool,
               prepare: Callable[[int], None] | None = None,
               layers: Layers | None = None) -> None:
    """Make root the whole filesystem of this mount namespace, with a fresh /proc and /dev.

    The root is root itself bound onto itself, or with layers an overlay mounted on root;
    either way nosuid,nodev. Every mount target inside the root is opened without following
    links, so no symlink of the archive can aim a mount at the host. prepare gets the root's
    descriptor after /dev is mounted and before the binds, which it cannot write through; with
    layers, what it and the program write lands in the upper layer.
    """
    if layers:
        mount_overlay(root, layers, userns)
    else:
        bind_root(root)
    # Opened after the bind: this is the new mount, not the directory underneath it.
    newroot = os.open(root, O_PATHDIR)
    try:
        mount_proc(newroot)
        mount_dev(newroot)
        if prepare:
            prepare(newroot)
        for bind in binds:
            bind_host_path(newroot, bind)
        os.fchdir(newroot)
    finally:
        os.close(newroot)

    # Stack the old root on top of the new one and detach it: no path leads to the host now.
    try:
        linux.pivot_root(".", ".")
        linux.umount2(".", linux.MNT_DETACH)
    except OSError as e:
        raise RunError(f"cannot switch to the root {root}: {e.strerror}") from e
    os.chdir("/")

    # In a user namespace too: the program owns that namespace's mounts, and without
    # CAP_SYS_ADMIN it cannot remount a read-only bind writable or unmount what hides the host.
    drop_capabilities()
    # Neither the program nor anything it runs gains privileges from setuid or file caps.
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)


def bind_root(root: str) -> None:
    # pivot_root needs a mount point; the bind is also where nosuid and nodev go.
    fd = os.open(root, O_PATHDIR)
    try:
        flags = os.fstatvfs(fd).f_flag
        mount_on(fd, root, fd_path(fd), None, linux.MS_BIND | linux.MS_REC)
    finally:
        os.close(fd)
    try:
        remount(root, flags, linux.MS_NOSUID | linux.MS_NODEV)
    except OSError as e:
        raise RunError(f"cannot make {root} nosuid,nodev: {e.strerror}") from e


def mount_overlay(root: str, layers: Layers, userns: bool) -> None:
    """Mount an overlay of layers on root, nosuid and nodev."""
    fds: list[int] = []
    try:
        for path in (layers.lower, layers.upper, layers.work, root):
            try:
                fds.append(os.open(path, O_PATHDIR))
            except OSError as e:
                raise RunError(f"cannot open {path} for the root's overlay: {e.strerror}") from e
        lower, upper, work, target = fds
        # Named by descriptor: no host path is looked up again, and none needs escaping.
        options = f"lowerdir={fd_path(lower)},upperdir={fd_path(upper)},workdir={fd_path(work)}"
        if userns:
            # Without real root, whiteouts and opaque directories are marked in user.* xattrs.
            options += ",userxattr"
        mount_on(target, root, "overlay", "overlay", linux.MS_NOSUID | linux.MS_NODEV, options)
    finally:
        for fd in fds:
            os.close(fd)


def remount(path: str, statvfs_flags: int, add: int) -> None:
    kept = sum(ms for st, ms in KEPT_FLAGS.items() if statvfs_flags & st)
    linux.mount(None, path, None, linux.MS_REMOUNT | linux.MS_BIND | add | kept)


def mount_proc(newroot: int) -> None:
    # A fresh proc of the new PID namespace: the host's processes stay invisible.
    flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    fd = mount_point(newroot, "proc", "/proc")
    try:
        mount_on(fd, "/proc", "proc", "proc", flags)
    finally:
        os.close(fd)

    # Real root could still reconfigure or reboot the host through these, as in Docker.
    proc = os.open("proc", O_PATHDIR, dir_fd=newroot)
    try:
        for name in PROC_READ_ONLY:
            path = f"{fd_path(proc)}/{name}"
            if os.path.exists(path):
                linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
                linux.mount(None, path, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY
                            | flags)
    except OSError as e:
        raise RunError(f"cannot make /proc/{name} read-only: {e.strerror}") from e
    finally:
        os.close(proc)


def mount_dev(newroot: int) -> None:
    # A small tmpfs with the harmless host devices bound in, as bubblewrap and mkosi do; the
    # archive's own /dev entries stay hidden underneath.
    fd = mount_point(newroot, "dev", "/dev")
    try:
        flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
        mount_on(fd, "/dev", "tmpfs", "tmpfs", flags, "mode=0755")
    finally:
        os.close(fd)

    # fd was the directory under the tmpfs; a fresh lookup gives the tmpfs itself.
    dev = os.open("dev", O_PATHDIR, dir_fd=newroot)
    try:
        for name in DEVICES:
            bind_device(dev, name)
        mount_devpts(dev)
        for name, target in DEV_LINKS:
            os.symlink(target, name, dir_fd=dev)
        os.mkdir("shm", dir_fd=dev)
        os.chmod("shm", 0o1777, dir_fd=dev)
    finally:
        os.close(dev)


def bind_device(dev: int, name: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o666, dir_fd=dev)
    try:
        linux.mount(f"/dev/{name}", fd_path(fd), None, linux.MS_BIND)
    except OSError as e:
        if name != "tty":
            raise RunError(f"cannot bind /dev/{name} into the root: {e.strerror}") from e
        # Some containers have no /dev/tty; without it programs get ENOENT, as on such a host.
        log.debug("no /dev/tty in the sandbox: %s", e.strerror)
        os.unlink(name, dir_fd=dev)
        return
    finally:
        os.close(fd)
    # These are the host's own nodes: read-only, the program can still read and write the
    # device, but chmod or chown through this mount fails instead of reaching the host.
    bound = os.open(name, O_PATHANY, dir_fd=dev)
    try:
        remount(fd_path(bound), os.statvfs(fd_path(bound)).f_flag,
                linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NOEXEC)
    except OSError as e:
        raise RunError(f"cannot make /dev/{name} read-only in the root: {e.strerror}") from e
    finally:
        os.close(bound)


def mount_devpts(dev: int) -> None:
    os.mkdir("pts", 0o755, dir_fd=dev)
    fd = os.open("pts", O_PATHDIR, dir_fd=dev)
    try:
        linux.mount("devpts", fd_path(fd), "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
                    "newinstance,ptmxmode=0666,mode=0620")
    except OSError as e:
        # Programs that need no pseudo-terminal still run.
        log.debug("no devpts in the sandbox: %s", e.strerror)
        return
    finally:
        os.close(fd)
    os.symlink("pts/ptmx", "ptmx", dir_fd=dev)


def bind_host_path(newroot: int, bind: Bind) -> None:
    """Bind bind.source over bind.dest in the root, nosuid and nodev, read-only if asked."""
    try:
        source = os.open(bind.source, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise RunError(f"cannot bind {bind.source}: {e.strerror}") from e
    parent, leaf = -1, ""
    try:
        parent, leaf = bind_target(newroot, bind.dest, os.path.isdir(fd_path(source)))
        target = os.open(leaf, O_PATHANY, dir_fd=parent)
        try:
            if stat.S_ISLNK(os.fstat(target).st_mode):
                raise RunError(f"cannot bind onto /{bind.dest}: it became a symlink")
            mount_on(target, f"/{bind.dest}", fd_path(source), None, linux.MS_BIND | linux.MS_REC)
        finally:
            os.close(target)
        # A fresh lookup gives the new mount rather than the file underneath it.
        mounted = os.open(leaf, O_PATHANY, dir_fd=parent)
        try:
            restrict_bind(mounted, bind)
        finally:
            os.close(mounted)
    finally:
        os.close(source)
        if parent >= 0:
            os.close(parent)


def bind_target(newroot: int, dest: str, is_dir: bool) -> tuple[int, str]:
    """Walk to dest below newroot, creating what is missing and refusing links.

    Returns the descriptor of dest's parent and dest's last name.
    """
    *dirs, leaf = dest.split("/")
    fd = os.dup(newroot)
    try:
        for depth, name in enumerate(dirs):
            ensure_target(fd, name, "/" + "/".join(dirs[:depth + 1]), dest, directory=True)
            child = os.open(name, O_PATHDIR, dir_fd=fd)
            os.close(fd)
            fd = child
        ensure_target(fd, leaf, f"/{dest}", dest, directory=is_dir)
        return fd, leaf
    except BaseException:
        os.close(fd)
        raise


def ensure_target(dir_fd: int, name: str, where: str, dest: str, directory: bool) -> None:
    """Make dir_fd/name exist as a directory, or as a file; refuse a symlink or the other kind."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        create_target(dir_fd, name, where, directory)
        return
    if stat.S_ISLNK(st.st_mode):
        what = f"a symlink to {os.readlink(name, dir_fd=dir_fd)}"
    elif stat.S_ISDIR(st.st_mode) != directory:
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
    else:
        return
    raise RunError(f"cannot bind onto /{dest}: {where} in the root is {what}",
                   hint="name the destination by its real path in the root")


def create_target(dir_fd: int, name: str, where: str, directory: bool) -> None:
    try:
        if directory:
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(name, flags, 0o644, dir_fd=dir_fd))
    except OSError as e:
        raise RunError(f"cannot create {where} in the root to bind onto: {e.strerror}") from e


def describe(dir_fd: int, name: str, err: OSError) -> str:
    try:
        return f"a symlink to {os.readlink(name, dir_fd=dir_fd)}"
    except OSError:
        return "not a directory" if err.errno == errno.ENOTDIR else f"unusable ({err.strerror})"


def restrict_bind(fd: int, bind: Bind) -> None:
    # The whole bound tree, submounts included, gets nosuid, nodev and perhaps rdonly. Adding
    # flags never clears the locked ones a user namespace must keep.
    attrs = linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV
    attrs |= linux.MOUNT_ATTR_RDONLY if bind.read_only else 0
    try:
        linux.mount_setattr(fd, linux.AT_RECURSIVE, attrs)
        return
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise RunError(f"cannot restrict the bind on /{bind.dest}: {e.strerror}") from e
    # TODO: drop this fallback, which restricts only the top mount, once every supported
    # kernel has mount_setattr(2) (Linux 5.12).
    try:
        add = linux.MS_NOSUID | linux.MS_NODEV | (linux.MS_RDONLY if bind.read_only else 0)
        remount(fd_path(fd), os.statvfs(fd_path(fd)).f_flag, add)
    except OSError as e:
        raise RunError(f"cannot restrict the bind on /{bind.dest}: {e.strerror}") from e


def mount_point(dirfd: int, name: str, where: str) -> int:
    """Open dirfd/name to mount over, refusing a symlink that could aim the mount at the host."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=dirfd)
    try:
        return os.open(name, O_PATHDIR, dir_fd=dirfd)
    except OSError as e:
        what = describe(dirfd, name, e)
        if what != "not a directory":
            what += ", not a directory"
        raise RunError(f"refusing to run: {where} in the root is {what}",
                       hint=f"{where} must be a plain directory in the archive") from e


def mount_on(fd: int, where: str, source: str | None, fstype: str | None, flags: int,
             data: str | None = None) -> None:
    # Through the descriptor, the mount lands on what was opened, whatever the path says now.
    try:
        linux.mount(source, fd_path(fd), fstype, flags, data)
    except OSError as e:
        raise RunError(f"cannot mount {fstype or source} on {where}: {e.strerror}") from e


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def drop_capabilities() -> None:
    for cap in range(linux.cap_last_cap() + 1):
        if cap in KEPT_CAPABILITIES:
            continue
        try:
            linux.prctl(linux.PR_CAPBSET_DROP, cap)
        except OSError as e:
            # EINVAL: this kernel does not know the capability, so nothing to drop.
            if e.errno != errno.EINVAL:
                raise
