"""runner: real namespaces, mounts and signals, in a tiny root built from the host's dash."""

import contextlib
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import pytest

from runner import RunError, linux, run, workspace

NOBODY = 65534
ENV = {"PATH": "/usr/bin:/bin"}
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


def build_root(root: str) -> None:
    """A usr-merged root with dash as sh, sleep, their libraries and a few broken programs."""
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
          workdir: str = "/") -> tuple[int, int]:
    """Fork rpack's side of a run: a workspace, a root built in it, run() of argv there.

    Returns the pid and a descriptor for the program's output (the terminal's, with tty).
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
            # An inheritable descriptor of the runner's that the program must not get.
            os.dup2(1, 7)
            if nobody:
                drop_to_nobody()
            with workspace(str(tmpdir)) as root:
                build_root(root)
                code = run(root, argv, ENV, workdir)
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


def sandbox(tmpdir: Path, argv: list[str], mode: str = "invoker",
            workdir: str = "/") -> tuple[int, str]:
    pid, out = start(tmpdir, argv, nobody=mode == "nobody", workdir=workdir)
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
