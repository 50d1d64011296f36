"""Run a program in an extracted root: the runner's side, and the relay into new namespaces."""

import contextlib
import errno
import json
import logging
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence

from runner import linux
from runner.cleanup import remove_tree
from runner.errors import RunError
from runner.identity import invoker
from runner.init import (
    FORWARDED,
    GRACE,
    WAITED,
    Job,
    init,
    read_all,
    reap,
    send,
    shell_status,
    supervise,
)
from runner.mounts import Bind, Layers, mount_overlay
from runner.terminal import Terminal

log = logging.getLogger(__name__)

# The runner also follows the caller's terminal's size.
TERMINAL_SIGNALS = frozenset({signal.SIGWINCH})

O_PATHDIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

USERNS_CAUSES = {
    errno.ENOSPC: "the limit user.max_user_namespaces is 0 or used up",
    errno.ENOSYS: "the kernel lacks user namespaces or a seccomp filter forbids unshare(2)",
    errno.EINVAL: "the kernel lacks user namespaces or a seccomp filter forbids unshare(2)",
}
USERNS_DISABLED = ("unprivileged user namespaces are probably disabled "
                   "(sysctl kernel.unprivileged_userns_clone=0, user.max_user_namespaces=0, "
                   "an AppArmor restriction such as kernel.apparmor_restrict_unprivileged_userns"
                   "=1, or a seccomp filter of a container)")


def run(root: str, argv: list[str], env: dict[str, str], workdir: str = "/", *,
        binds: Sequence[Bind] = (), grace: float = GRACE, host_files: bool = True,
        layers: Layers | None = None) -> "Status":
    """Run argv inside the extracted root and return its exit status, the way a shell does.

    The status is the program's own, 128+N if signal N ended it (and then, for the signals
    that end a process without a core dump, `signal` says N), 126 if it could not be
    executed and 127 if it is not in the root. RunError means the sandbox itself failed.
    The root gets /etc/passwd and /etc/group entries for uid and gid 0, and with host_files
    the host's /etc/resolv.conf and /etc/hosts, read-only (runner.identity). With layers,
    root is an empty directory that the sandbox mounts their overlay on (check_overlay).
    Call it from the main thread: it blocks the forwarded signals there while it waits.
    """
    root = os.path.abspath(root)
    check_request(root, argv, env, workdir)
    report_r, report_w = os.pipe()
    terminal = Terminal.open()
    job = Job(root, list(argv), dict(env), workdir, list(binds), userns=os.geteuid() != 0,
              tty=terminal.setup if terminal else None, report=report_w, grace=grace,
              user=invoker(), host_files=host_files, layers=layers)
    log.debug("running %s in %s%s", argv, root, " in a user namespace" if job.userns else "")
    try:
        status = start(job, terminal)
        reports = read_reports(report_r)
    finally:
        os.close(report_r)
        if terminal:
            terminal.close()

    ended_by = None
    for report in reports:
        if "warning" in report:
            log.warning("%s", report["warning"])
        if "error" in report:
            raise RunError(report["error"], report.get("hint"))
        if "exec" in report:
            log.error("%s", report["exec"])
        if report.get("signal", "").isdigit() and status == 128 + int(report["signal"]):
            ended_by = int(report["signal"])
    return Status(status, ended_by)


class Status(int):
    """An exit status the way a shell gives it; `signal` is the signal that ended the program
    when rpack should end of it too (runner.init.ENDING_SIGNALS), else None."""

    signal: int | None

    def __new__(cls, code: int, ended_by: int | None = None) -> "Status":
        status = super().__new__(cls, code)
        status.signal = ended_by
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


def check_namespaces() -> None:
    """Raise RunError now, before anything is unpacked, if the sandbox's namespaces fail."""
    for report in run_probe(probe):
        if "error" in report:
            raise RunError(report["error"], report.get("hint"))


def run_probe(step: Callable[[], int]) -> list[dict[str, str]]:
    """Run step in a throwaway child (runner.sandbox.spawn) and return what it reported."""
    report_r, report_w = os.pipe()
    try:
        try:
            pid = spawn(step, report_w)
        finally:
            os.close(report_w)
        os.waitpid(pid, 0)
        return read_reports(report_r)
    finally:
        os.close(report_r)


def probe() -> int:
    enter_namespaces(os.geteuid() != 0)
    return 0


def check_overlay(place: str) -> str | None:
    """Why the sandbox cannot mount an overlay with its layers in place; None if it can.

    A throwaway child tries, in namespaces of its own, on empty directories made in place and
    removed again.
    """
    probe_dir = os.path.join(place, "overlay-probe")
    os.mkdir(probe_dir, 0o700)
    try:
        layers = Layers(*(os.path.join(probe_dir, name) for name in ("lower", "upper", "work")))
        root = os.path.join(probe_dir, "root")
        for path in (layers.lower, layers.upper, layers.work, root):
            os.mkdir(path, 0o700)
        reports = run_probe(lambda: probe_overlay(root, layers))
    finally:
        remove_tree(probe_dir)
    return next((report["error"] for report in reports if "error" in report), None)


def probe_overlay(root: str, layers: Layers) -> int:
    userns = os.geteuid() != 0
    enter_namespaces(userns)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    mount_overlay(root, layers, userns)
    return 0


def start(job: Job, terminal: Terminal | None) -> int:
    """Fork the relay and wait for it, passing on signals and the terminal's bytes."""
    # Whatever rpack printed so far comes before the program's output.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()
    runner = os.getpid()
    waited = WAITED | (TERMINAL_SIGNALS if terminal else set())
    # Blocked, the signals wait in a signalfd; the relay and the init inherit the mask and
    # collect theirs with sigwaitinfo(), so none is lost between fork and wait.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        try:
            pid = spawn(lambda: relay(job, runner, terminal), job.report)
        finally:
            os.close(job.report)
            if terminal:
                terminal.forked()
        try:
            return wait_for(pid, waited, terminal)
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
    finally:
        if terminal:
            terminal.restore()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def wait_for(pid: int, waited: frozenset[int] | set[int], terminal: Terminal | None) -> int:
    """The runner's loop: pass signals on to the relay, relay the terminal, until it ends."""
    sigfd = linux.signalfd(waited)
    try:
        while True:
            wanted = {sigfd: select.POLLIN, **(terminal.events() if terminal else {})}
            poller = select.poll()
            for fd, mask in wanted.items():
                poller.register(fd, mask)
            ready = dict(poller.poll())
            if sigfd in ready:
                for sig in linux.read_signals(sigfd):
                    status = reap(pid, orphans=False) if sig == signal.SIGCHLD else None
                    if status is not None:
                        if terminal:
                            terminal.drain()
                        return shell_status(status)
                    if sig in FORWARDED:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, sig)
                    follow_job_control(sig, terminal)
            if terminal:
                terminal.pump(ready)
    finally:
        os.close(sigfd)


def follow_job_control(sig: int, terminal: Terminal | None) -> None:
    """Stop with the program (Ctrl-Z or kill -TSTP), go on with it, follow the window size.

    On a terminal of its own the program is the whole session, as on a console: Ctrl-Z is its
    business, and the runner never stops.
    """
    if sig == signal.SIGTSTP and not terminal:
        os.kill(os.getpid(), signal.SIGSTOP)
    elif sig == signal.SIGCONT and terminal:
        terminal.enter_raw_mode()
        terminal.resize()
    elif sig == signal.SIGWINCH and terminal:
        terminal.resize()


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


def relay(job: Job, runner: int, terminal: Terminal | None) -> int:
    """The runner's child: enter new namespaces, fork the init into them and wait for it."""
    # Die with the runner, so that a killed rpack leaves no sandbox behind.
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != runner:
        return 125
    if terminal:
        terminal.leave()
    # A session of its own keeps the sandbox from the caller's terminal: no TIOCSTI, no
    # signals from its keyboard but those the runner passes on.
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
    if job.tty:
        os.close(job.tty.sock)
    return shell_status(supervise(pid, orphans=False, grace=job.grace, report=job.report))


def enter_namespaces(userns: bool) -> None:
    """Unshare mount, PID and IPC namespaces, and as non-root a user namespace mapping us to 0."""
    uid, gid = os.geteuid(), os.getegid()
    flags = linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWIPC
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


def read_reports(fd: int) -> list[dict[str, str]]:
    reports = []
    for line in read_all(fd).splitlines():
        with contextlib.suppress(ValueError):
            report = json.loads(line)
            if isinstance(report, dict):
                reports.append({str(k): str(v) for k, v in report.items()})
    return reports
