"""runner: real namespaces, mounts and signals, in a tiny root built from the host's dash."""

import contextlib
import os
import pty
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from runner import Bind, RunError, linux, run, workspace

NOBODY = 65534
ENV = {"PATH": "/usr/bin:/bin"}
SECRET = "runner-secret-8f2e"
PROGRAMS = ("/bin/dash", "/usr/bin/sleep")

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: a switch to uid 65534, or mounts in a test")
# Every run as the invoking user (root in CI), and the same as nobody, through a user namespace.
MODES = ["invoker", pytest.param("nobody", marks=[pytest.mark.root, needs_root])]

# The program's shell counts SIGINTs: a signal passed on twice shows as count=2. It spins
# until the first one, so that its trap runs at once and a late copy is not merged into it.
COUNT_SIGINT = ("n=0; trap 'n=$((n+1))' INT; echo started; "
                "while [ $n -eq 0 ]; do :; done; sleep 0.5; echo count=$n")


@cache
def libraries() -> list[str]:
    """The libraries and the loader PROGRAMS need, as ldd names them."""
    out = subprocess.run(["ldd", *PROGRAMS], capture_output=True, text=True, check=True).stdout
    return sorted({word for line in out.splitlines() for word in line.split()
                   if word.startswith("/") and not word.endswith(":")})


def build_root(root: str, extra: dict[str, str] | None = None) -> None:
    """A usr-merged root with dash as sh, sleep, their libraries and a few broken programs.

    `extra` maps more paths in the root to the host files copied there.
    """
    for name in ("usr/bin", "usr/lib", "usr/lib64", "proc", "dev", "tmp"):
        os.makedirs(os.path.join(root, name))
    for name in ("bin", "lib", "lib64"):
        os.symlink(f"usr/{name}", os.path.join(root, name))
    for path in libraries():
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        shutil.copy(path, root + path)
    for path in PROGRAMS:
        shutil.copy(path, os.path.join(root, "usr/bin", os.path.basename(path)))
    os.symlink("dash", os.path.join(root, "usr/bin/sh"))

    Path(root, "usr/bin/noexec").write_text("#!/bin/sh\n")
    os.chmod(os.path.join(root, "usr/bin/noexec"), 0o644)
    Path(root, "usr/bin/nointerp").write_text("#!/no/such/interpreter\n")
    os.chmod(os.path.join(root, "usr/bin/nointerp"), 0o755)
    for path, source in (extra or {}).items():
        shutil.copy(source, root + path)


def drop_to_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def mountinfo() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


def wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found, status = os.waitpid(pid, os.WNOHANG)
        if found:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"process {pid} still ran after {timeout} s")


def read(fd: int, until: bytes | None = None, timeout: float = 20) -> str:
    """Read fd to its end, or only until `until` shows up."""
    data = b""
    deadline = time.monotonic() + timeout
    while (until is None or until not in data) and time.monotonic() < deadline:
        if not select.select([fd], [], [], deadline - time.monotonic())[0]:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side of a terminal is closed
            break
        if not chunk:
            break
        data += chunk
    return data.decode()


def in_child(body: Callable[[], None], *, nobody: bool = False) -> None:
    """Run body in a forked process, as nobody if asked; its failure fails the test."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if nobody:
                drop_to_nobody()
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    assert wait(pid, 60) == 0, "the child failed: see its traceback in the captured stderr"


def start(tmpdir: Path, argv: list[str], *, nobody: bool = False, tty: bool = False,
          workdir: str = "/", binds: tuple[Bind, ...] = (), grace: float = 10,
          extra: dict[str, str] | None = None, stdin: str | None = None,
          prepare: Callable[[str], None] | None = None) -> tuple[int, int]:
    """Fork rpack's side of a run: a workspace, a root built in it, run() of argv there.

    Returns the pid and a descriptor for the program's output (the terminal's, with tty).
    The runner's own environment holds SECRET, which the program must not be able to read.
    `prepare` finishes the root, before the runner drops to nobody. `stdin` names a file to
    put on the runner's standard input.
    """
    libraries()
    out_w = -1
    if tty:
        pid, out = pty.fork()
    else:
        out, out_w = os.pipe()
        pid = os.fork()
    if pid == 0:
        code = 124
        try:
            if not tty:
                os.dup2(out_w, 1)
            if stdin:
                os.dup2(os.open(stdin, os.O_RDONLY), 0)
            # An inheritable descriptor of the runner's that the program must not get.
            os.dup2(1, 7)
            if nobody:
                drop_to_nobody()
            os.environ["RPACK_TEST_SECRET"] = SECRET
            with workspace(str(tmpdir)) as root:
                build_root(root, extra)
                if prepare:
                    prepare(root)
                code = run(root, argv, ENV, workdir, binds=binds, grace=grace)
        except RunError as e:
            print(f"RunError: {e}", file=sys.stderr)
            code = 125
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    if not tty:
        os.close(out_w)
    return pid, out


def sandbox(tmpdir: Path, argv: list[str], mode: str = "invoker", workdir: str = "/",
            **options: Any) -> tuple[int, str]:
    pid, out = start(tmpdir, argv, nobody=mode == "nobody", workdir=workdir, **options)
    output = read(out)
    os.close(out)
    return wait(pid, 20), output


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A sticky, world-writable directory like /tmp; nobody cannot reach tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="rpack-test-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path)


CASES = [
    pytest.param(["sh", "-c", "echo ok; exit 3"], 3, "ok\n", id="echo-exit-3"),
    pytest.param(["sh", "-c", "exit 0"], 0, "", id="exit-0"),
    pytest.param(["sh", "-c", "exit 7"], 7, "", id="exit-7"),
    pytest.param(["/usr/bin/noexec"], 126, "", id="not-executable"),
    pytest.param(["nointerp"], 126, "", id="interpreter-missing"),
    pytest.param(["missing"], 127, "", id="missing"),
    pytest.param(["/usr/bin/missing"], 127, "", id="missing-path"),
    pytest.param(["sh", "-c", "kill -TERM $$"], 143, "", id="killed-by-TERM"),
    pytest.param(["sh", "-c", "kill -INT $$"], 130, "", id="killed-by-INT"),
    # Python ignores these two; the program must get them back at their defaults.
    pytest.param(["sh", "-c", "kill -PIPE $$; echo ignored"], 141, "", id="killed-by-PIPE"),
    pytest.param(["sh", "-c", "kill -XFSZ $$; echo ignored"], 153, "", id="killed-by-XFSZ"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("argv", "status", "output"), CASES)
def test_exit_status(shared_tmp: Path, mode: str, argv: list[str], status: int,
                     output: str) -> None:
    assert sandbox(shared_tmp, argv, mode) == (status, output)


@pytest.mark.parametrize("mode", MODES)
def test_program_sees_only_the_sandbox_processes(shared_tmp: Path, mode: str) -> None:
    # PID 1 is the init, PID 2 the shell.
    assert sandbox(shared_tmp, ["sh", "-c", "echo /proc/[0-9]*"], mode) == (0, "/proc/1 /proc/2\n")


@pytest.mark.parametrize("mode", MODES)
def test_program_gets_no_new_privileges_and_only_the_standard_fds(shared_tmp: Path,
                                                                  mode: str) -> None:
    script = ("while read key value; do [ $key = NoNewPrivs: ] && echo $value; "
              "done < /proc/self/status; echo x > /dev/null && echo /dev/null works; "
              "for fd in 3 4 5 6 7 8 9; do [ -e /proc/self/fd/$fd ] && echo open: $fd; done; :")
    # The runner holds descriptor 7; dash itself uses 10 and up.
    assert sandbox(shared_tmp, ["sh", "-c", script], mode) == (0, "1\n/dev/null works\n")


@pytest.mark.root
@needs_root
def test_nobody_is_root_of_its_own_user_namespace(shared_tmp: Path) -> None:
    script = "read m < /proc/self/uid_map; echo $m; read g < /proc/self/setgroups; echo $g"
    assert sandbox(shared_tmp, ["sh", "-c", script], "nobody") == (0, "0 65534 1\ndeny\n")


@pytest.mark.root
@needs_root
def test_root_loses_capabilities_that_reach_the_host(shared_tmp: Path) -> None:
    script = "while read key value; do [ $key != CapBnd: ] || echo $value; done < /proc/self/status"
    status, output = sandbox(shared_tmp, ["sh", "-c", script])
    bounding = int(output, 16)
    assert status == 0
    for cap in (linux.CAP_SYS_ADMIN, linux.CAP_SYS_MODULE, linux.CAP_MKNOD, linux.CAP_SYS_RAWIO):
        assert not bounding & (1 << cap)
    assert bounding & (1 << 0)  # CAP_CHOWN: root still owns the root


@pytest.mark.parametrize("mode", MODES)
def test_host_settings_in_proc_are_read_only(shared_tmp: Path, mode: str) -> None:
    # Only access(2): a test must never write a host setting, not even its own value back
    # (a sysctl file answers only a read at offset 0, so dash's bytewise `read` gets one digit).
    script = "[ -w /proc/sys/fs/file-max ] || echo read-only"
    assert sandbox(shared_tmp, ["sh", "-c", script], mode) == (0, "read-only\n")


@pytest.mark.parametrize("mode", MODES)
def test_workdir(shared_tmp: Path, mode: str) -> None:
    assert sandbox(shared_tmp, ["sh", "-c", "pwd"], mode, workdir="/tmp") == (0, "/tmp\n")


def test_missing_workdir_is_a_run_error(tmp_path: Path) -> None:
    build_root(str(tmp_path))
    with pytest.raises(RunError, match="working directory /nowhere"):
        run(str(tmp_path), ["sh", "-c", "true"], ENV, "/nowhere")


@pytest.mark.parametrize("mode", MODES)
def test_no_mount_is_left_behind(shared_tmp: Path, mode: str) -> None:
    before = mountinfo()
    assert sandbox(shared_tmp, ["sh", "-c", "echo ok"], mode) == (0, "ok\n")
    assert mountinfo() == before


@pytest.mark.parametrize("name", ["proc", "dev"])
def test_symlinked_mount_point_is_refused(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    build_root(str(root))
    (root / name).rmdir()
    (root / name).symlink_to(decoy)
    before = mountinfo()

    with pytest.raises(RunError, match=f"/{name} in the root is a symlink to {decoy}"):
        run(str(root), ["sh", "-c", "echo escaped"], ENV)
    assert mountinfo() == before
    assert list(decoy.iterdir()) == []


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_to_the_runner_ends_the_program(shared_tmp: Path, mode: str) -> None:
    pid, out = start(shared_tmp, ["sh", "-c", "echo started; exec sleep 30"],
                     nobody=mode == "nobody")
    assert read(out, until=b"started") == "started\n"
    began = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    assert wait(pid, 10) == 143
    assert time.monotonic() - began < 5
    os.close(out)


def sleepers(seconds: str) -> list[int]:
    """Live processes running `sleep seconds` (a zombie has an empty command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == (
                    f"sleep\0{seconds}\0".encode()):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def wait_for(condition: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_to_the_runner_leaves_no_process_and_no_mount(shared_tmp: Path,
                                                               mode: str) -> None:
    before = mountinfo()
    seconds = f"{len(mode)}{os.getpid()}.5"  # a command line no other test runs
    script = f"sleep {seconds} & echo started; exec sleep {seconds}"
    pid, out = start(shared_tmp, ["sh", "-c", script], nobody=mode == "nobody")
    try:
        assert read(out, until=b"started") == "started\n"
        assert wait_for(lambda: len(sleepers(seconds)) == 2)
        os.kill(pid, signal.SIGKILL)
        assert wait(pid, 10) == -signal.SIGKILL
        assert wait_for(lambda: not sleepers(seconds))
        assert mountinfo() == before
    finally:
        # Only if the test failed: leave nothing running for the next tests. An unreaped
        # child keeps its pid, so killing it cannot hit another process.
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        for leftover in sleepers(seconds):
            with contextlib.suppress(OSError):
                os.kill(leftover, signal.SIGKILL)
        os.close(out)


@pytest.mark.parametrize("mode", MODES)
def test_background_processes_end_with_the_program(shared_tmp: Path, mode: str) -> None:
    seconds = f"{len(mode)}{os.getpid()}.25"
    began = time.monotonic()
    assert sandbox(shared_tmp, ["sh", "-c", f"sleep {seconds} & exit 0"], mode) == (0, "")
    assert time.monotonic() - began < 5
    assert wait_for(lambda: not sleepers(seconds))


@pytest.mark.parametrize("mode", MODES)
def test_sigint_to_the_runner_reaches_the_program_once(shared_tmp: Path, mode: str) -> None:
    pid, out = start(shared_tmp, ["sh", "-c", COUNT_SIGINT], nobody=mode == "nobody")
    assert read(out, until=b"started") == "started\n"
    os.kill(pid, signal.SIGINT)
    assert read(out) == "count=1\n"
    assert wait(pid, 10) == 0
    os.close(out)


@pytest.mark.parametrize("mode", MODES)
def test_ctrl_c_on_a_terminal_reaches_the_program_once(shared_tmp: Path, mode: str) -> None:
    pid, terminal = start(shared_tmp, ["sh", "-c", COUNT_SIGINT], nobody=mode == "nobody",
                          tty=True)
    assert "started" in read(terminal, until=b"started")
    os.write(terminal, b"\x03")
    assert "count=1" in read(terminal, until=b"count=")
    assert wait(pid, 10) == 0
    os.close(terminal)


@pytest.mark.root
@needs_root
def test_unavailable_user_namespaces_are_reported(tmp_path: Path) -> None:
    def body() -> None:
        # A private user namespace where we are uid 65534 (so run() needs a user namespace
        # of its own) and where none may be created; the host's limit stays untouched.
        linux.unshare(linux.CLONE_NEWUSER)
        Path("/proc/self/uid_map").write_text(f"{NOBODY} 0 1\n")
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/gid_map").write_text(f"{NOBODY} 0 1\n")
        Path("/proc/sys/user/max_user_namespaces").write_text("0\n")
        with pytest.raises(RunError, match=r"user namespaces are not available") as caught:
            with workspace(str(tmp_path)) as root:
                run(root, ["sh"], ENV)
        assert caught.value.hint and "max_user_namespaces" in caught.value.hint
        assert list(Path(tmp_path, f"rpack-{NOBODY}").iterdir()) == []

    in_child(body)


def test_workspace_removes_its_directory_and_nothing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    os.chmod(outside / "keep", 0o644)

    with workspace(str(tmp_path)) as root:
        Path(root, "a/b").mkdir(parents=True)
        Path(root, "a/b/file").write_text("x")
        Path(root, "a/filelink").symlink_to(outside / "keep")
        Path(root, "a/dirlink").symlink_to(outside)
    assert not os.path.lexists(root)
    assert os.listdir(outside) == ["keep"]
    assert os.stat(outside / "keep").st_mode & 0o777 == 0o644
    base = os.stat(os.path.dirname(root))
    assert (base.st_uid, base.st_mode & 0o777) == (os.geteuid(), 0o700)


def test_workspace_is_removed_after_an_interrupt_and_kept_on_request(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), workspace(str(tmp_path)) as root:
        Path(root, "file").write_text("x")
        raise KeyboardInterrupt
    assert not os.path.lexists(root)

    with workspace(str(tmp_path), keep=True) as kept:
        pass
    assert os.path.isdir(kept)


@pytest.mark.parametrize("mode", MODES)
def test_workspace_deletes_unwritable_directories(shared_tmp: Path, mode: str) -> None:
    def body() -> None:
        # A file of ours outside, reachable through a link in an unwritable directory: the
        # CVE-2023-6597 pattern that made TemporaryDirectory chmod it.
        outside = Path(tempfile.mkdtemp(dir=shared_tmp)) / "outside"
        outside.write_text("keep")
        outside.chmod(0o644)
        with workspace(str(shared_tmp)) as root:
            Path(root, "ro/none/deeper").mkdir(parents=True)
            Path(root, "ro/none/deeper/file").write_text("x")
            Path(root, "ro/link").symlink_to(outside)
            os.chmod(Path(root, "ro/none/deeper"), 0o555)
            os.chmod(Path(root, "ro/none"), 0o000)
            os.chmod(Path(root, "ro"), 0o555)
            os.chmod(root, 0o500)
        assert not os.path.lexists(root)
        assert outside.read_text() == "keep"
        assert outside.stat().st_mode & 0o777 == 0o644

    in_child(body, nobody=mode == "nobody")


def test_workspace_deletes_a_3000_deep_tree(tmp_path: Path) -> None:
    with workspace(str(tmp_path)) as root:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(3000):
            os.mkdir("d", dir_fd=fd)
            deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        os.close(os.open("file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        os.close(fd)
    assert not os.path.lexists(root)


@pytest.mark.root
@needs_root
def test_workspace_refuses_to_delete_across_a_mount(tmp_path: Path) -> None:
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "canary").write_text("keep")

    def body() -> None:
        # The bind mount lives in a mount namespace private to this child.
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        with pytest.raises(RunError, match="mnt point is mounted inside it"):
            with workspace(str(tmp_path)) as root:
                Path(root, "file").write_text("x")
                Path(root, "mnt point").mkdir()
                linux.mount(str(decoy), os.path.join(root, "mnt point"), None, linux.MS_BIND)
        assert Path(root, "file").exists()
        assert Path(root, "mnt point/canary").read_text() == "keep"

    in_child(body)
    assert (decoy / "canary").read_text() == "keep"


def test_workspace_refuses_a_symlinked_base(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / f"rpack-{os.geteuid()}").symlink_to(elsewhere)
    with pytest.raises(RunError, match="symlink"), workspace(str(tmp_path)):
        pass
    assert list(elsewhere.iterdir()) == []


@pytest.mark.root
@needs_root
def test_workspace_refuses_a_base_of_another_user(tmp_path: Path) -> None:
    base = tmp_path / f"rpack-{os.geteuid()}"
    base.mkdir()
    os.chown(base, NOBODY, NOBODY)
    with pytest.raises(RunError, match=f"belongs to uid {NOBODY}"), workspace(str(tmp_path)):
        pass
    assert list(base.iterdir()) == []


# --- escapes, devices and PID 1 ---------------------------------------------------------------

PROBE_C = r"""
/* Tries to leave the sandbox; prints one line per attempt. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static int escape(const char *marker) {
    /* The chroot(2) man page's escape: chroot into a subdirectory while the working
       directory stays outside it, climb, and make what was reached the root. */
    if (mkdir("/tmp/jail", 0700) != 0 && errno != EEXIST)
        return printf("mkdir: %s\n", strerror(errno)), 1;
    if (chroot("/tmp/jail") != 0)
        return printf("chroot: %s\n", strerror(errno)), 0;
    for (int i = 0; i < 64; i++)
        if (chdir("..") != 0)
            break;
    if (chroot(".") != 0)
        return printf("chroot: %s\n", strerror(errno)), 0;
    printf(access(marker, F_OK) == 0 ? "escaped\n" : "contained\n");
    return 0;
}

static int open_device(const char *path) {
    int fd = open(path, O_WRONLY);
    printf("open: %s\n", fd >= 0 ? "ok" : strerror(errno));
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "escape") == 0)
        return escape(argv[2]);
    if (argc == 3 && strcmp(argv[1], "mknod") == 0) {
        int made = mknod(argv[2], S_IFCHR | 0666, makedev(1, 3));
        printf("mknod: %s\n", made == 0 ? "ok" : strerror(errno));
        return open_device(argv[2]);
    }
    if (argc == 3 && strcmp(argv[1], "open") == 0)
        return open_device(argv[2]);
    if (argc == 3 && strcmp(argv[1], "tiocsti") == 0) {
        /* Pushes a command into the terminal's input, for its shell to run later. */
        char c = '#';
        int pushed = ioctl(atoi(argv[2]), TIOCSTI, &c);
        printf("tiocsti: %s\n", pushed == 0 ? "ok" : strerror(errno));
        return 0;
    }
    return 2;
}
"""


@pytest.fixture(scope="session")
def probe() -> Iterator[str]:
    """A static program that tries the escapes of security.md section 3.1 (nobody reads it)."""
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler (gcc) on this machine")
    where = Path(tempfile.mkdtemp(prefix="rpack-probe-"))
    where.chmod(0o755)
    (where / "probe.c").write_text(PROBE_C)
    subprocess.run(["gcc", "-static", "-O1", "-o", str(where / "probe"), str(where / "probe.c")],
                   check=True, capture_output=True)
    yield str(where / "probe")
    shutil.rmtree(where)


@pytest.fixture
def marker(shared_tmp: Path) -> Iterator[Path]:
    """A host file that no program in a root may reach."""
    path = Path(tempfile.mkdtemp(dir=shared_tmp)) / "host-marker"
    path.write_text("host")
    yield path
    assert path.read_text() == "host"


@pytest.mark.parametrize("mode", MODES)
def test_nested_chroot_does_not_reach_the_host(shared_tmp: Path, mode: str, probe: str,
                                               marker: Path) -> None:
    status, output = sandbox(shared_tmp, ["probe", "escape", str(marker)], mode,
                             extra={"/usr/bin/probe": probe})
    assert status == 0
    # Neither real root nor the root of a user namespace keeps CAP_SYS_CHROOT; were it kept,
    # there would still be nothing above the pivoted, detached root.
    assert output == "chroot: Operation not permitted\n"


@pytest.mark.parametrize("mode", MODES)
def test_device_node_cannot_be_made(shared_tmp: Path, mode: str, probe: str) -> None:
    status, output = sandbox(shared_tmp, ["probe", "mknod", "/tmp/null"], mode,
                             extra={"/usr/bin/probe": probe})
    assert (status, output) == (0, "mknod: Operation not permitted\n"
                                   "open: No such file or directory\n")


@pytest.mark.root
@needs_root
def test_device_node_in_the_root_cannot_be_used(shared_tmp: Path, probe: str) -> None:
    # A node made on the host (an archive never carries one) is useless: the root is nodev.
    def mknod(root: str) -> None:
        os.mknod(os.path.join(root, "tmp/null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))

    status, output = sandbox(shared_tmp, ["probe", "open", "/tmp/null"],
                             extra={"/usr/bin/probe": probe}, prepare=mknod)
    assert (status, output) == (0, "open: Permission denied\n")


@pytest.mark.parametrize("mode", MODES)
def test_pid_1_shows_nothing_of_the_runner(shared_tmp: Path, mode: str) -> None:
    # The init is not dumpable: its environment (the runner's), memory and descriptors stay
    # closed to the program, whatever uid both have. Once the program runs, the init holds
    # 0, 1, 2 and the write end of its report pipe to the runner (to say which signal ended
    # the program), and none can be opened (as real root, the names can be listed).
    script = ("sleep 0.5; for f in /proc/1/environ /proc/1/mem; do "
              "if read -r x < $f; then echo readable: $f; fi; done 2>/dev/null; "
              "held=0; for fd in /proc/1/fd/*; do [ -e $fd ] && echo reachable: $fd; "
              "case ${fd##*/} in 0|1|2|'*') ;; *) held=$((held + 1));; esac; done; "
              "[ $held -le 1 ] || echo held: $held; "
              "[ -e /proc/self/fd/0 ] && echo own descriptors reachable")
    assert sandbox(shared_tmp, ["sh", "-c", script], mode) == (
        0, "own descriptors reachable\n")


@pytest.mark.parametrize("mode", MODES)
def test_program_starts_with_default_signals(shared_tmp: Path, mode: str) -> None:
    script = ("while read key value; do case $key in SigBlk:|SigIgn:) echo $key $value;; esac; "
              "done < /proc/self/status")
    assert sandbox(shared_tmp, ["sh", "-c", script], mode) == (
        0, "SigBlk: 0000000000000000\nSigIgn: 0000000000000000\n")


@pytest.mark.parametrize("mode", MODES)
def test_init_reaps_orphans(shared_tmp: Path, mode: str) -> None:
    # The subshell's sleep is orphaned at once and ends while the program still runs.
    script = ("(sleep 0.1 &); sleep 1; for f in /proc/[0-9]*/stat; do read -r line < $f; "
              "case $line in *') Z '*) echo zombie: $line;; esac; done; echo done")
    assert sandbox(shared_tmp, ["sh", "-c", script], mode) == (0, "done\n")


@pytest.mark.parametrize("mode", MODES)
def test_signals_sent_to_pid_1_from_inside_are_not_passed_on(shared_tmp: Path,
                                                             mode: str) -> None:
    script = "kill -TERM 1; kill -INT 1; sleep 0.5; echo still running"
    assert sandbox(shared_tmp, ["sh", "-c", script], mode) == (0, "still running\n")


@pytest.mark.parametrize("mode", MODES)
def test_program_ignoring_sigterm_is_killed_after_the_grace_period(shared_tmp: Path,
                                                                   mode: str) -> None:
    seconds = f"{len(mode)}{os.getpid()}.75"
    script = f"trap '' TERM; sleep {seconds} & echo started; wait"
    pid, out = start(shared_tmp, ["sh", "-c", script], nobody=mode == "nobody", grace=1)
    assert read(out, until=b"started") == "started\n"
    os.kill(pid, signal.SIGTERM)
    assert wait(pid, 20) == 128 + signal.SIGKILL
    assert wait_for(lambda: not sleepers(seconds))
    os.close(out)


# --- binds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_bind_host_paths_read_write_and_read_only(shared_tmp: Path, mode: str) -> None:
    shared = Path(tempfile.mkdtemp(dir=shared_tmp))
    shared.chmod(0o777)
    config = shared_tmp / f"config-{mode}"
    config.write_text("from the host\n")
    config.chmod(0o666)
    binds = (Bind.parse(f"{shared}:/data"), Bind.parse(f"{config}:/etc/deep/config:ro"))
    script = ("read -r x < /etc/deep/config; echo $x; echo made > /data/new && echo wrote; "
              "echo changed > /etc/deep/config || echo read-only")
    status, output = sandbox(shared_tmp, ["sh", "-c", f"{script} 2>/dev/null"], mode, binds=binds)
    assert (status, output) == (0, "from the host\nwrote\nread-only\n")
    assert (shared / "new").read_text() == "made\n"
    assert config.read_text() == "from the host\n"


@pytest.mark.parametrize("mode", MODES)
def test_bind_defaults_to_the_same_path(shared_tmp: Path, mode: str) -> None:
    shared = Path(tempfile.mkdtemp(dir=shared_tmp))
    shared.chmod(0o755)
    (shared / "hello").write_text("hi\n")
    (shared / "hello").chmod(0o644)
    status, output = sandbox(shared_tmp, ["sh", "-c", f"read x < {shared}/hello; echo $x"], mode,
                             binds=(Bind.parse(str(shared)),))
    assert (status, output) == (0, "hi\n")


@pytest.mark.parametrize(("dest", "message"), [
    ("/bin/data", "/bin in the root is a symlink to usr/bin"),
    ("/decoy/sub", "/decoy in the root is a symlink to {outside}"),
    ("/decoy", "/decoy in the root is a symlink to {outside}"),
    ("/usr/bin/sh/x", "/usr/bin/sh in the root is a symlink to dash"),
    ("/usr/bin/noexec/x", "/usr/bin/noexec in the root is not a directory"),
    ("/usr/bin/noexec", "/usr/bin/noexec in the root is not a directory"),
])
def test_bind_destination_through_a_link_is_refused(tmp_path: Path, dest: str,
                                                    message: str) -> None:
    root = tmp_path / "root"
    build_root(str(root))
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "decoy").symlink_to(outside)
    source = tmp_path / "source"
    source.mkdir()
    before = mountinfo()
    with pytest.raises(RunError, match=message.format(outside=outside)):
        run(str(root), ["sh", "-c", "true"], ENV, binds=[Bind.parse(f"{source}:{dest}")])
    assert mountinfo() == before
    assert list(outside.iterdir()) == []
    assert not (root / "usr/bin/data").exists()


def test_bind_of_a_file_onto_a_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    build_root(str(root))
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="/usr/bin in the root is a directory"):
        run(str(root), ["sh", "-c", "true"], ENV, binds=[Bind.parse(f"{tmp_path}/file:/usr/bin")])


@pytest.mark.parametrize(("text", "bind"), [
    ("/a", Bind("/a", "a")),
    ("/a:/b", Bind("/a", "b")),
    ("/a:/b/./c/:ro", Bind("/a", "b/c", read_only=True)),
    ("/a::rw", Bind("/a", "a")),
])
def test_bind_parse(text: str, bind: Bind) -> None:
    assert Bind.parse(text) == bind


@pytest.mark.parametrize(("text", "message"), [
    ("/a:b", "absolute path"), ("/a:/../etc", "without '..'"), ("/a:/", "whole root"),
    ("/a:/b:rx", "ro or rw"), (":/b", "SRC"), ("/a:/b:ro:x", "SRC"),
])
def test_bind_parse_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Bind.parse(text)


# --- workspace: locking and sweeping ----------------------------------------------------------


def test_stale_roots_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    with workspace(str(tmp_path)) as live:
        base = Path(live).parent
        # A root whose runner was killed: nobody holds its lock.
        stale = base / "run-stale"
        (stale / "usr/deep").mkdir(parents=True)
        (stale / "usr/deep/file").write_text("x")
        os.chmod(stale / "usr/deep", 0o500)
        kept = base / "keep-earlier"
        kept.mkdir()
        with workspace(str(tmp_path)) as other:
            assert Path(live).is_dir()
            assert not stale.exists()
            assert kept.is_dir()
        assert not os.path.lexists(other)
    assert sorted(p.name for p in base.iterdir()) == ["keep-earlier"]


def test_workspace_root_is_locked_while_in_use(tmp_path: Path) -> None:
    import fcntl

    with workspace(str(tmp_path)) as root:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_sweep_never_follows_links_or_crosses_mounts(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("keep")
    with workspace(str(tmp_path)) as root:
        base = Path(root).parent
    (base / "run-link").symlink_to(elsewhere)
    (base / "run-dir").mkdir()
    (base / "run-dir" / "link").symlink_to(elsewhere)
    with workspace(str(tmp_path)):
        pass
    assert sorted(p.name for p in base.iterdir()) == ["run-link"]
    assert (elsewhere / "keep").read_text() == "keep"


@pytest.mark.root
@needs_root
def test_stale_root_with_a_mount_is_refused_not_deleted(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "canary").write_text("keep")

    def body() -> None:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        base = tmp_path / f"rpack-{os.geteuid()}"
        (base / "run-stale" / "mnt").mkdir(parents=True, mode=0o700)
        base.chmod(0o700)
        linux.mount(str(decoy), str(base / "run-stale" / "mnt"), None, linux.MS_BIND)
        with workspace(str(tmp_path)):
            pass
        assert (base / "run-stale" / "mnt" / "canary").read_text() == "keep"

    in_child(body)
    assert (decoy / "canary").read_text() == "keep"


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("mode", MODES)
def test_noexec_base_is_refused_before_anything_is_made(shared_tmp: Path, mode: str) -> None:
    place = shared_tmp / "noexec"
    place.mkdir()

    def body() -> None:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        linux.mount("tmpfs", str(place), "tmpfs", linux.MS_NOEXEC, "mode=1777")
        if mode == "nobody":
            drop_to_nobody()
        with pytest.raises(RunError, match="is on a noexec filesystem"), \
                workspace(str(place)):
            pass
        assert [p.name for p in place.iterdir()] == [f"rpack-{os.geteuid()}"]
        assert list(place.glob("*/*")) == []

    in_child(body)


def state(pid: int) -> str:
    """The state letter of a process (R, S, T...), or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return ""


@pytest.mark.parametrize("mode", MODES)
def test_sigtstp_stops_the_program_with_the_runner_and_sigcont_resumes_it(shared_tmp: Path,
                                                                         mode: str) -> None:
    # What Ctrl-Z does when only stdout is a terminal: the shell waits for rpack to stop.
    seconds = f"{len(mode)}{os.getpid()}.125"
    script = f"sleep {seconds} & echo started; sleep {seconds}"
    pid, out = start(shared_tmp, ["sh", "-c", script], nobody=mode == "nobody")
    try:
        assert read(out, until=b"started") == "started\n"
        assert wait_for(lambda: len(sleepers(seconds)) == 2)
        os.kill(pid, signal.SIGTSTP)
        _, status = os.waitpid(pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        assert wait_for(lambda: {state(p) for p in sleepers(seconds)} == {"T"})

        os.kill(pid, signal.SIGCONT)
        assert wait_for(lambda: {state(p) for p in sleepers(seconds)} == {"S"})
        os.kill(pid, signal.SIGTERM)
        assert wait(pid, 20) == 143
        assert wait_for(lambda: not sleepers(seconds))
    finally:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        os.close(out)


@pytest.mark.parametrize("mode", MODES)
def test_program_cannot_push_input_into_the_callers_terminal(shared_tmp: Path, mode: str,
                                                             probe: str) -> None:
    # stdout is the caller's terminal, stdin is not: no pseudo-terminal, and the caller's
    # terminal is not the program's controlling terminal (EIO where legacy_tiocsti is off).
    pid, terminal = start(shared_tmp, ["probe", "tiocsti", "1"], nobody=mode == "nobody",
                          tty=True, stdin="/dev/null", extra={"/usr/bin/probe": probe})
    output = read(terminal)
    assert wait(pid, 20) == 0
    assert output.replace("\r", "") in ("tiocsti: Operation not permitted\n",
                                        "tiocsti: Input/output error\n")
    os.close(terminal)


@pytest.mark.parametrize("mode", MODES)
def test_program_on_a_terminal_leads_a_session_with_a_terminal_of_its_own(shared_tmp: Path,
                                                                          mode: str) -> None:
    # Fields of /proc/self/stat: pid (comm) state ppid pgrp session tty_nr.
    script = ("read -r line < /proc/self/stat; set -- $line; [ $1 = $6 ] && echo leader; "
              "[ $7 != 0 ] && echo controlling terminal; [ -t 0 ] && [ -t 1 ] && echo on it; "
              "[ -c /dev/pts/0 ] && echo pts/0")
    pid, terminal = start(shared_tmp, ["sh", "-c", script], nobody=mode == "nobody", tty=True)
    output = read(terminal)
    assert wait(pid, 20) == 0
    assert output.replace("\r", "") == "leader\ncontrolling terminal\non it\npts/0\n"
    os.close(terminal)
