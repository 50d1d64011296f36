"""Run a program inside an extracted root: namespaces, private mounts, pivot_root, a tiny init."""

import contextlib
import errno
import json
import logging
import os
import select
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from runner import linux

log = logging.getLogger(__name__)

# What a user sends to stop or poke a program: the runner and the init pass these on.
FORWARDED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2}
WAITED = FORWARDED | {signal.SIGCHLD}
# si_code of a signal the kernel sent itself, such as Ctrl-C from a terminal.
SI_KERNEL = 0x80

PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"))

# Real root keeps its capabilities in the sandbox. These would let it reach past the root:
# load modules, raw I/O and new device nodes, mounts, reboot and the clock, immutable files
# that cleanup could not delete, tracing, and the host's network, audit and MAC setup.
DROPPED_CAPABILITIES = (
    linux.CAP_SYS_MODULE, linux.CAP_SYS_RAWIO, linux.CAP_MKNOD, linux.CAP_SYS_ADMIN,
    linux.CAP_SYS_BOOT, linux.CAP_SYS_TIME, linux.CAP_WAKE_ALARM, linux.CAP_LINUX_IMMUTABLE,
    linux.CAP_SYS_PTRACE, linux.CAP_SYS_CHROOT, linux.CAP_SYS_PACCT, linux.CAP_NET_ADMIN,
    linux.CAP_SYSLOG, linux.CAP_AUDIT_CONTROL, linux.CAP_MAC_ADMIN, linux.CAP_MAC_OVERRIDE,
    linux.CAP_SYS_TTY_CONFIG, linux.CAP_BLOCK_SUSPEND, linux.CAP_BPF,
)

# Flags the remount of the root must keep: in a user namespace they are locked and a remount
# that drops one fails.
KEPT_FLAGS = {os.ST_RDONLY: linux.MS_RDONLY, os.ST_NOEXEC: linux.MS_NOEXEC,
              os.ST_NOATIME: linux.MS_NOATIME, os.ST_NODIRATIME: linux.MS_NODIRATIME,
              os.ST_RELATIME: linux.MS_RELATIME}

O_PATHDIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

USERNS_CAUSES = {
    errno.ENOSPC: "the limit user.max_user_namespaces is 0 or used up",
    errno.ENOSYS: "the kernel lacks user namespaces or a seccomp filter forbids unshare(2)",
    errno.EINVAL: "the kernel lacks user namespaces or a seccomp filter forbids unshare(2)",
}
USERNS_DISABLED = ("unprivileged user namespaces are probably disabled "
                   "(sysctl kernel.unprivileged_userns_clone=0, user.max_user_namespaces=0, "
                   "or an AppArmor restriction: kernel.apparmor_restrict_unprivileged_userns=1)")


class RunError(Exception):
    """rpack could not run the program; the CLI prints it, and the hint, and exits 125."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Job:
    root: str
    argv: list[str]
    env: dict[str, str]
    workdir: str
    userns: bool
    on_tty: bool
    report: int


def run(root: str, argv: list[str], env: dict[str, str], workdir: str = "/") -> int:
    """Run argv inside the extracted root and return its exit status, the way a shell does.

    The status is the program's own, 128+N if signal N ended it, 126 if it could not be
    executed and 127 if it is not in the root. RunError means the sandbox itself failed.
    Call it from the main thread: it blocks the forwarded signals there while it waits.
    """
    root = os.path.abspath(root)
    check_request(root, argv, env, workdir)
    report_r, report_w = os.pipe()
    job = Job(root, list(argv), dict(env), workdir, userns=os.geteuid() != 0,
              on_tty=os.isatty(0), report=report_w)
    log.debug("running %s in %s%s", argv, root, " in a user namespace" if job.userns else "")
    try:
        status = start(job)
        report = read_report(report_r)
    finally:
        os.close(report_r)

    if "error" in report:
        raise RunError(report["error"], report.get("hint"))
    if "exec" in report:
        log.error("%s", report["exec"])
    return status


def check_request(root: str, argv: list[str], env: dict[str, str], workdir: str) -> None:
    if not argv or not argv[0]:
        raise RunError("no program to run")
    if not workdir.startswith("/"):
        raise RunError(f"the working directory must be an absolute path: {workdir}")
    if any("\0" in s for s in [*argv, *env, *env.values(), workdir]):
        raise RunError("a NUL byte in the arguments or the environment")
    bad = [key for key in env if not key or "=" in key]
    if bad:
        raise RunError(f"invalid environment variable names: {bad}")

    try:
        fd = os.open(root, O_PATHDIR)
    except OSError as e:
        raise RunError(f"cannot use {root} as the root: {e.strerror}") from e
    try:
        noexec = os.fstatvfs(fd).f_flag & os.ST_NOEXEC
    finally:
        os.close(fd)
    if noexec:
        raise RunError(f"{root} is on a noexec filesystem, where nothing can be run",
                       hint="choose a temporary directory elsewhere with --tmpdir or $TMPDIR")


def start(job: Job) -> int:
    """Fork the relay and wait for it, passing on signals; this is the runner's own part."""
    # Whatever rpack printed so far comes before the program's output.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()
    runner = os.getpid()
    # Blocked signals wait for sigwaitinfo(), which tells a forwarded kill from Ctrl-C.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
    try:
        try:
            pid = spawn(lambda: relay(job, runner), job.report)
        finally:
            os.close(job.report)
        try:
            return supervise(pid, job.on_tty, orphans=False)
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def spawn(step: Callable[[], int], report: int) -> int:
    """Fork a child that runs step and exits with its result; it reports failures on report."""
    pid = os.fork()
    if pid:
        return pid
    code = 125
    try:
        code = step()
    except RunError as e:
        send(report, {"error": str(e), **({"hint": e.hint} if e.hint else {})})
    except BaseException as e:
        send(report, {"error": f"the sandbox failed: {e}"})
    finally:
        os._exit(code)


def relay(job: Job, runner: int) -> int:
    """The runner's child: enter new namespaces, fork the init into them and wait for it."""
    # Die with the runner, so that a killed rpack leaves no sandbox behind.
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != runner:
        return 125
    # Without a terminal on stdin, a session of its own keeps the program from the caller's
    # terminal (no TIOCSTI); the runner then forwards every signal itself.
    if not job.on_tty:
        os.setsid()
    enter_namespaces(job.userns)

    # Before any other mount: as root on a host with shared mounts (systemd), every mount
    # below would otherwise propagate to the host.
    try:
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    except OSError as e:
        raise RunError(f"cannot make the sandbox's mounts private: {e.strerror}") from e

    # Only the first child forked after unshare(CLONE_NEWPID) is PID 1 of the new namespace.
    # It polls this pidfd to learn whether we died before it could ask for PDEATHSIG.
    lifeline = os.pidfd_open(os.getpid())
    pid = spawn(lambda: init(job, lifeline), job.report)
    os.close(lifeline)
    return supervise(pid, job.on_tty, orphans=False)


def enter_namespaces(userns: bool) -> None:
    uid, gid = os.geteuid(), os.getegid()
    flags = linux.CLONE_NEWNS | linux.CLONE_NEWPID
    if userns:
        flags |= linux.CLONE_NEWUSER
        # A process that changed its uid is not dumpable, which leaves its uid_map owned by
        # the real root and unwritable; the normal state is fine for this throwaway child.
        linux.prctl(linux.PR_SET_DUMPABLE, 1)
    try:
        linux.unshare(flags)
    except OSError as e:
        raise namespace_error(e, userns) from e
    if not userns:
        return

    # Map our uid and gid to root inside; setgroups must be denied before gid_map is written.
    for name, line in (("uid_map", f"0 {uid} 1"), ("setgroups", "deny"),
                       ("gid_map", f"0 {gid} 1")):
        try:
            fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as e:
            raise RunError(f"user namespaces are not available (writing /proc/self/{name}: "
                           f"{e.strerror})", hint=f"{USERNS_DISABLED}; or run rpack as root") from e


def namespace_error(err: OSError, userns: bool) -> RunError:
    if not userns:
        return RunError(f"cannot create mount and PID namespaces ({err.strerror})",
                        hint="a container or a seccomp filter may forbid unshare(2)")
    cause = USERNS_CAUSES.get(err.errno or 0, USERNS_DISABLED)
    return RunError(f"user namespaces are not available ({err.strerror})",
                    hint=f"{cause}; enable them, or run rpack as root")


def init(job: Job, lifeline: int) -> int:
    """PID 1 of the sandbox: build the root, start the program, pass signals on and reap."""
    # Die with the relay; if it is already gone, that signal will never come.
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([lifeline], [], [], 0)[0]:
        return 125
    os.close(lifeline)

    enter_root(job.root, job.userns)
    try:
        os.chdir(job.workdir)
    except OSError as e:
        raise RunError(f"cannot enter the working directory {job.workdir} in the root: "
                       f"{e.strerror}") from e

    pid, err = start_program(job.argv, job.env)
    if err is not None:
        code, message = exec_failure(err, job.argv[0], job.env)
        send(job.report, {"exec": message})
        return code
    os.close(job.report)
    return supervise(pid, job.on_tty, orphans=True)


def enter_root(root: str, userns: bool) -> None:
    """Make root the whole filesystem of this mount namespace, with a fresh /proc and /dev."""
    bind_root(root)
    # Opened after the bind: this is the new mount, not the directory underneath it.
    newroot = os.open(root, O_PATHDIR)
    try:
        mount_proc(newroot)
        mount_dev(newroot)
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

    if not userns:
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
    kept = sum(ms for st, ms in KEPT_FLAGS.items() if flags & st)
    try:
        linux.mount(None, root, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_NOSUID
                    | linux.MS_NODEV | kept)
    except OSError as e:
        raise RunError(f"cannot make {root} nosuid,nodev: {e.strerror}") from e


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
    finally:
        os.close(fd)


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


def mount_point(dirfd: int, name: str, where: str) -> int:
    """Open dirfd/name to mount over, refusing a symlink that could aim the mount at the host."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=dirfd)
    try:
        return os.open(name, O_PATHDIR, dir_fd=dirfd)
    except OSError as e:
        try:
            what = f"a symlink to {os.readlink(name, dir_fd=dirfd)}"
        except OSError:
            what = f"unusable ({e.strerror})"
        raise RunError(f"refusing to run: {where} in the root is {what}, not a directory",
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
    for cap in DROPPED_CAPABILITIES:
        try:
            linux.prctl(linux.PR_CAPBSET_DROP, cap)
        except OSError as e:
            # EINVAL: this kernel does not know the capability, so nothing to drop.
            if e.errno != errno.EINVAL:
                raise


def start_program(argv: list[str], env: dict[str, str]) -> tuple[int, int | None]:
    """Fork and exec the program; return its pid and the errno of a failed exec, if any."""
    exec_r, exec_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(exec_r)
        exec_program(argv, env, exec_w)
    os.close(exec_w)
    # The pipe is close-on-exec: end of file with no data means the exec succeeded.
    data = read_all(exec_r)
    os.close(exec_r)
    return pid, int(data) if data else None


def exec_program(argv: list[str], env: dict[str, str], exec_w: int) -> NoReturn:
    err = errno.EINVAL
    try:
        # Python ignores SIGPIPE and SIGXFSZ and handles SIGINT; the program must start with
        # the defaults and the empty mask a shell would give it.
        for sig in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        # Only 0, 1 and 2 go to the program: an inherited descriptor could lead out of the root.
        os.closerange(3, exec_w)
        os.closerange(exec_w + 1, os.sysconf("SC_OPEN_MAX"))
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        err = e.errno or errno.EINVAL
    finally:
        with contextlib.suppress(OSError):
            os.write(exec_w, str(err).encode())
        os._exit(127)


def exec_failure(err: int, name: str, env: dict[str, str]) -> tuple[int, str]:
    """Map a failed exec to the shell's status and a message, judged from inside the root."""
    if err != errno.ENOENT:
        return 126, f"cannot execute {name}: {os.strerror(err)}"
    paths = [name] if "/" in name else [os.path.join(d or ".", name)
                                        for d in os.get_exec_path(env)]
    found = next((path for path in paths if os.path.exists(path)), None)
    if found is None:
        return 127, f"{name}: not found in the root"
    # The file is there, so what is missing is its ELF interpreter or its #! interpreter.
    return 126, f"cannot execute {found}: its interpreter is missing from the root"


def supervise(pid: int, on_tty: bool, orphans: bool) -> int:
    """Pass signals on to pid until it ends, and return its status the way a shell does.

    The caller has blocked WAITED. With orphans (the init's case) any other child is reaped.
    """
    while True:
        info = signal.sigwaitinfo(WAITED)
        if info.si_signo == signal.SIGCHLD:
            status = reap(pid, orphans)
            if status is not None:
                return status
        # Ctrl-C and friends from the terminal already reached the whole foreground group.
        elif not (on_tty and info.si_code == SI_KERNEL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, info.si_signo)


def reap(pid: int, orphans: bool) -> int | None:
    while True:
        found, status = os.waitpid(-1 if orphans else pid, os.WNOHANG)
        if found == 0:
            return None
        if found == pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


def send(fd: int, message: dict[str, str]) -> None:
    os.write(fd, json.dumps(message).encode() + b"\n")


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_report(fd: int) -> dict[str, str]:
    data = read_all(fd)
    if not data:
        return {}
    report: dict[str, str] = json.loads(data.splitlines()[0])
    return report
