"""The program's terminal: a pseudo-terminal inside the sandbox, relayed to the caller's."""

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import termios
import tty
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 65536


@dataclass(frozen=True)
class TtySetup:
    """What the init needs to give the program a terminal like the caller's."""

    attrs: list[Any]  # termios.tcgetattr() of the caller's terminal
    size: bytes  # its struct winsize
    fds: tuple[int, ...]  # which of 0, 1 and 2 are that terminal
    sock: int  # where the init sends the master of the new pseudo-terminal


class Terminal:
    """The runner's side: the caller's terminal in raw mode, relayed to and from the master.

    The program gets a pseudo-terminal of the sandbox's own devpts, in a session of its own,
    so that job control, Ctrl-C and window sizes work as on the caller's terminal while
    TIOCSTI and the like reach only the sandbox's terminal, never the caller's.
    """

    def __init__(self, setup: TtySetup, ours: socket.socket, out: int) -> None:
        self.setup = setup
        self.sock: socket.socket | None = ours
        self.out = out
        self.theirs = setup.sock
        self.master = -1
        self.to_master = b""
        self.reading = True
        self.raw = False

    @classmethod
    def open(cls) -> "Terminal | None":
        """A Terminal if stdin is a terminal rpack runs in the foreground of, else None: pipes
        and files pass untouched, and so does the terminal of a job in the background (raw
        mode would stop it, as any background job changing its terminal is stopped)."""
        try:
            if os.tcgetpgrp(0) != os.getpgrp():
                return None
            attrs = termios.tcgetattr(0)
            size = fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8))
            rdev = os.fstat(0).st_rdev
        except (OSError, termios.error):
            return None
        fds = tuple(fd for fd in (0, 1, 2) if same_terminal(fd, rdev))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The init finds it among its descriptors; the runner closes its copy after the fork.
        setup = TtySetup(attrs, size, fds, theirs.detach())
        out = next((fd for fd in (1, 2) if fd in fds), 0)
        return cls(setup, ours, out)

    def forked(self) -> None:
        """The sandbox has its end of the socket now."""
        os.close(self.theirs)
        self.theirs = -1

    def leave(self) -> None:
        """In the relay: close the runner's end of the socket, keep the sandbox's."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        if self.theirs >= 0:
            os.close(self.theirs)
            self.theirs = -1
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def events(self) -> dict[int, int]:
        """What to poll for: the socket until the master comes, then the master and stdin."""
        if self.sock is not None:
            return {self.sock.fileno(): select.POLLIN}
        wanted: dict[int, int] = {}
        if self.master >= 0:
            wanted[self.master] = select.POLLIN | (select.POLLOUT if self.to_master else 0)
            if self.reading and not self.to_master:
                wanted[0] = select.POLLIN
        return wanted

    def pump(self, ready: dict[int, int]) -> None:
        """Move what is ready: the master's arrival, keystrokes in, the program's output out."""
        if self.sock is not None and self.sock.fileno() in ready:
            self.receive_master()
            return
        if ready.get(0):
            self.read_input()
        if ready.get(self.master, 0) & select.POLLOUT and self.to_master:
            self.write_input()
        if ready.get(self.master, 0) & (select.POLLIN | select.POLLHUP | select.POLLERR):
            self.copy_output()

    def receive_master(self) -> None:
        assert self.sock is not None
        try:
            _, fds, _, _ = socket.recv_fds(self.sock, 16, 1)
        except OSError:
            fds = []
        self.sock.close()
        self.sock = None
        if not fds:
            return  # the sandbox failed, or runs the program without a terminal
        self.master = fds[0]
        os.set_blocking(self.master, False)
        self.enter_raw_mode()
        # The size may have changed while the sandbox was being built.
        self.resize()

    def read_input(self) -> None:
        try:
            data = os.read(0, CHUNK)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return
            data = b""  # EIO: the terminal hung up
        if data:
            self.to_master += data
        else:
            self.reading = False

    def write_input(self) -> None:
        try:
            self.to_master = self.to_master[os.write(self.master, self.to_master):]
        except BlockingIOError:
            pass
        except OSError:
            self.to_master = b""  # EIO: the program's side is gone; keystrokes go nowhere

    def copy_output(self) -> None:
        """Copy what the program wrote; close the master once nobody holds the slave side."""
        while True:
            try:
                data = os.read(self.master, CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""  # EIO: nobody holds the slave side any more
            if not data:
                os.close(self.master)
                self.master = -1
                return
            write_all(self.out, data)

    def drain(self) -> None:
        """After the sandbox ended: the program's last output, still in the master."""
        if self.master >= 0:
            self.copy_output()

    def resize(self) -> None:
        if self.master < 0:
            return
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8))
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)

    def enter_raw_mode(self) -> None:
        # Keystrokes go to the sandbox's terminal unchanged; its line discipline does the rest
        # (echo, Ctrl-C, Ctrl-Z), as the program set it up.
        if self.master < 0:
            return
        with contextlib.suppress(OSError, termios.error):
            tty.setraw(0, termios.TCSADRAIN)
            self.raw = True

    def restore(self) -> None:
        if self.raw:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(0, termios.TCSADRAIN, self.setup.attrs)
            self.raw = False


def same_terminal(fd: int, rdev: int) -> bool:
    try:
        return os.isatty(fd) and os.fstat(fd).st_rdev == rdev
    except OSError:
        return False


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])
        except OSError:
            return  # the caller's terminal is gone: the output has nowhere to go


def open_pty(setup: TtySetup) -> int | None:
    """In the sandbox: a pseudo-terminal set up like the caller's; its master goes to the runner.

    Returns the slave, or None when the sandbox has no devpts (the program then runs on the
    caller's descriptors, without a controlling terminal).
    """
    sock = socket.socket(fileno=setup.sock)
    try:
        try:
            master, slave = os.openpty()
        except OSError as e:
            log.debug("no pseudo-terminal in the sandbox: %s", e.strerror)
            return None
        try:
            termios.tcsetattr(slave, termios.TCSANOW, setup.attrs)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, setup.size)
            socket.send_fds(sock, [b"pty"], [master])
        except BaseException:
            os.close(slave)
            raise
        finally:
            os.close(master)
        return slave
    finally:
        sock.close()


def become_controlled(slave: int, fds: tuple[int, ...]) -> None:
    """In the program, before exec: a session whose controlling terminal is the slave."""
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in fds:
        os.dup2(slave, fd)
