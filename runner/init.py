"""PID 1 of the sandbox: builds the root, starts the program, passes signals on and reaps."""

import contextlib
import errno
import json
import logging
import os
import select
import signal
import time
from dataclasses import dataclass, field
from typing import NoReturn

from runner import linux
from runner.errors import RunError
from runner.identity import prepare_etc
from runner.mounts import Bind, Layers, enter_root
from runner.terminal import TtySetup, become_controlled, open_pty

log = logging.getLogger(__name__)

# What a user sends to stop or poke a program: the runner, the relay and the init pass these on,
# with the job control signals that stop and continue it.
JOB_CONTROL = frozenset({signal.SIGTSTP, signal.SIGCONT})
FORWARDED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                       signal.SIGUSR1, signal.SIGUSR2}) | JOB_CONTROL
WAITED = FORWARDED | {signal.SIGCHLD}
GROUP_SIGNALS = JOB_CONTROL | {signal.SIGINT, signal.SIGQUIT}
# Signals that end a process without a core dump, which rpack re-raises when one ended the
# program (util-linux unshare does the same); SIGKILL is left out, since rpack's own grace
# period sends it.
ENDING_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGPIPE, signal.SIGALRM,
                            signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2})
# How long a program may take to end after rpack passed it a SIGTERM (docker stop's default).
GRACE = 10.0


@dataclass(frozen=True)
class Job:
    """One program to run in one root, and how."""

    root: str
    argv: list[str]
    env: dict[str, str]
    workdir: str
    binds: list[Bind] = field(default_factory=list)
    userns: bool = False
    tty: TtySetup | None = None
    report: int = -1  # where the relay and the init report failures to the runner
    grace: float = GRACE
    user: str = "root"  # the invoking user's name on the host, for the generated passwd
    host_files: bool = True  # bind the host's resolv.conf and hosts read-only
    layers: Layers | None = None  # mount the root as an overlay of these (runner.cache)


def init(job: Job, lifeline: int) -> int:
    """PID 1 of the sandbox: build the root, start the program, pass signals on and reap."""
    # Die with the relay; if it is already gone, that signal will never come.
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([lifeline], [], [], 0)[0]:
        return 125
    # The program sees PID 1 in /proc. It must find none of the runner's descriptors there
    # (a directory of the host would lead out of the root) and no way to trace it or read
    # its memory and environment.
    close_fds_but(0, 1, 2, job.report, *([job.tty.sock] if job.tty else []))
    linux.prctl(linux.PR_SET_DUMPABLE, 0)

    def prepare(newroot: int) -> None:
        for warning in prepare_etc(newroot, job.user, job.host_files):
            send(job.report, {"warning": warning})

    enter_root(job.root, job.binds, job.userns, prepare, job.layers)
    try:
        os.chdir(job.workdir)
    except OSError as e:
        raise RunError(f"cannot enter the working directory {job.workdir} in the root: "
                       f"{e.strerror}") from e

    slave = open_pty(job.tty) if job.tty else None
    if job.tty and slave is None:
        send(job.report, {"warning": "the sandbox has no pseudo-terminal: the program runs "
                                     "without a controlling terminal"})
    pid, err = start_program(job, slave)
    if slave is not None:
        os.close(slave)
    if err is not None:
        code, message = exec_failure(err, job.argv[0], job.env)
        send(job.report, {"exec": message})
        return code
    code = supervise(pid, orphans=True)
    if -code in ENDING_SIGNALS:
        # The runner ends of it in turn, so that a shell loop running rpack stops on Ctrl-C
        # as it would with the program.
        send(job.report, {"signal": str(-code)})
    os.close(job.report)
    return shell_status(code)


def close_fds_but(*keep: int) -> None:
    low = 0
    for fd in [*sorted(set(keep)), os.sysconf("SC_OPEN_MAX")]:
        # Never an empty range: closerange(n, n) becomes close_range(n, ~0), closing all.
        if low < fd:
            os.closerange(low, fd)
        low = fd + 1


def start_program(job: Job, slave: int | None) -> tuple[int, int | None]:
    """Fork and exec the program; return its pid and the errno of a failed exec, if any."""
    exec_r, exec_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(exec_r)
        exec_program(job, slave, exec_w)
    os.close(exec_w)
    # The pipe is close-on-exec: end of file with no data means the exec succeeded.
    data = read_all(exec_r)
    os.close(exec_r)
    return pid, int(data) if data else None


def exec_program(job: Job, slave: int | None, exec_w: int) -> NoReturn:
    err = errno.EINVAL
    try:
        # Python ignores SIGPIPE and SIGXFSZ and handles SIGINT; the program must start with
        # the defaults and the empty mask a shell would give it.
        for sig in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if slave is not None and job.tty is not None:
            become_controlled(slave, job.tty.fds)
        else:
            # A group of its own, whose parent (the init) is in another group of the same
            # session: not orphaned, so a SIGTSTP passed on stops it, as Ctrl-Z would.
            os.setpgid(0, 0)
        # Only 0, 1 and 2 go to the program: an inherited descriptor could lead out of the root.
        close_fds_but(0, 1, 2, exec_w)
        os.execvpe(job.argv[0], job.argv, job.env)
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


def supervise(pid: int, *, orphans: bool, grace: float | None = None, report: int = -1) -> int:
    """Pass signals on to pid until it ends, and return its status as reap does (-N for
    signal N).

    The caller has blocked WAITED. With orphans (the init's case) any other child is reaped
    and signals sent from inside the sandbox are not passed on. With grace (the relay's
    case), pid gets SIGKILL if it still runs that many seconds after a SIGTERM.
    """
    deadline: float | None = None
    while True:
        info: signal.struct_siginfo | None
        if deadline is None:
            info = signal.sigwaitinfo(WAITED)
        else:
            info = signal.sigtimedwait(WAITED, max(0.0, deadline - time.monotonic()))
        if info is None:
            send(report, {"warning": f"the program still ran {grace:g} s after SIGTERM, "
                                     "so it was killed"})
            os.kill(pid, signal.SIGKILL)
            deadline = grace = None
        elif info.si_signo == signal.SIGCHLD:
            status = reap(pid, orphans)
            if status is not None:
                return status
        elif orphans and info.si_pid != 0:
            # A process of the sandbox signalled PID 1; only the outside speaks through it.
            log.debug("ignored signal %d from pid %d", info.si_signo, info.si_pid)
        else:
            forward(pid, info.si_signo, group=orphans)
            if info.si_signo == signal.SIGTERM and grace is not None and deadline is None:
                deadline = time.monotonic() + grace


def forward(pid: int, sig: int, group: bool) -> None:
    # What a terminal's keys send (interrupt, quit, stop) and continuing reach the program's
    # whole process group, as a terminal sends them to its foreground group: Ctrl-C ends
    # `sh -c 'sleep 100'` with its sleep, even off a terminal.
    if group and sig in GROUP_SIGNALS:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
            return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def shell_status(code: int) -> int:
    """A code from reap the way a shell gives it: 128+N for a process ended by signal N."""
    return code if code >= 0 else 128 - code


def reap(pid: int, orphans: bool) -> int | None:
    while True:
        try:
            found, status = os.waitpid(-1 if orphans else pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if found == 0:
            return None
        if found == pid:
            return os.waitstatus_to_exitcode(status)  # -N: ended by signal N


def send(fd: int, message: dict[str, str]) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.write(fd, json.dumps(message).encode() + b"\n")


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
