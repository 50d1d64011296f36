"""Thin ctypes wrappers for the Linux system calls Python 3.11 does not expose."""

import ctypes
import errno
import os
import signal
import struct
from collections.abc import Iterable

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21

MNT_DETACH = 2

AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

# Capability numbers from linux/capability.h: the ones a sandboxed root keeps.
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_SYS_MODULE = 16
CAP_SYS_RAWIO = 17
CAP_SYS_CHROOT = 18
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_MKNOD = 27
CAP_AUDIT_WRITE = 29
CAP_SETFCAP = 31

# glibc has no pivot_root() or mount_setattr() wrapper; the numbers differ per architecture.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}

SFD_CLOEXEC = os.O_CLOEXEC
SIGNALFD_SIGINFO_SIZE = 128

libc = ctypes.CDLL(None, use_errno=True)
libc.unshare.argtypes = [ctypes.c_int]
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]
libc.signalfd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]

# One function object per system call, so that each keeps its own argument types.
_pivot_root = libc["syscall"]
_pivot_root.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_char_p]
_pivot_root.restype = ctypes.c_long
_mount_setattr = libc["syscall"]
_mount_setattr.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint,
                           ctypes.c_void_p, ctypes.c_size_t]
_mount_setattr.restype = ctypes.c_long


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def check(result: int, path: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return result


def encode(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def syscall_number(table: dict[str, int], name: str) -> int:
    number = table.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, f"no {name} number for {os.uname().machine}")
    return number


def unshare(flags: int) -> None:
    check(libc.unshare(flags))


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    check(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), target)


def umount2(target: str, flags: int) -> None:
    check(libc.umount2(encode(target), flags), target)


def pivot_root(new_root: str, put_old: str) -> None:
    number = syscall_number(SYS_PIVOT_ROOT, "pivot_root")
    check(_pivot_root(number, encode(new_root), encode(put_old)), new_root)


def mount_setattr(fd: int, flags: int, attr_set: int) -> None:
    """Add attr_set to the mount fd is on (and to those below it, with AT_RECURSIVE)."""
    number = syscall_number(SYS_MOUNT_SETATTR, "mount_setattr")
    attr = MountAttr(attr_set, 0, 0, 0)
    check(_mount_setattr(number, fd, b"", flags | AT_EMPTY_PATH, ctypes.byref(attr),
                         ctypes.sizeof(attr)))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return check(int(libc.prctl(option, arg2, arg3, arg4, arg5)))


def cap_last_cap() -> int:
    """The highest capability number this kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40  # CAP_CHECKPOINT_RESTORE, the last one in Linux 6.x


def signalfd(signals: Iterable[int]) -> int:
    """A descriptor that reads the given signals; block them first, or they are delivered."""
    mask = (ctypes.c_ulong * 16)()  # glibc's sigset_t: 1024 bits
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    for sig in signals:
        mask[(sig - 1) // bits] |= 1 << ((sig - 1) % bits)
    return check(libc.signalfd(-1, ctypes.byref(mask), SFD_CLOEXEC))


def read_signals(fd: int) -> list[signal.Signals]:
    """The signals waiting on a signalfd (it must be readable)."""
    data = os.read(fd, 16 * SIGNALFD_SIGINFO_SIZE)
    # struct signalfd_siginfo starts with the 32-bit signal number.
    return [signal.Signals(struct.unpack_from("=I", data, offset)[0])
            for offset in range(0, len(data), SIGNALFD_SIGINFO_SIZE)]
