"""Programs that need more than libraries, seen as a user sees them: git's helpers, less, bash."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, rpack, rpack_env

pytestmark = [pytest.mark.root, pytest.mark.heavy]


def test_git_runs_a_helper_from_git_core_packed_by_trace(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    out = tmp_path / "git.tar.zst"
    created = rpack("create", "--trace", out, "/usr/bin/git", "--", "mergetool", "--tool-help",
                    cwd=repo)
    assert created.returncode == 0, created.stderr
    listing = rpack("list", out).stdout
    assert "usr/lib/git-core/git-mergetool" in listing
    done = rpack("run", "--bind", f"{repo}:/work", "--workdir", "/work", out,
                 "mergetool", "--tool-help")
    assert done.returncode == 0, done.stderr
    assert "vimdiff" in done.stdout


class Tmux:
    """A tmux server of the test's own, on its own socket, killed at the end."""

    def __init__(self) -> None:
        self.socket = f"rpack-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, check=True)
        return done.stdout

    def start(self, command: str) -> None:
        self("new-session", "-d", "-x", "80", "-y", "24", command)

    def screen(self) -> str:
        return self("capture-pane", "-p")

    def wait_for(self, found: Callable[[str], bool], timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if found(screen) or time.monotonic() > deadline:
                return screen
            time.sleep(0.2)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    server = Tmux()
    yield server
    subprocess.run(["tmux", "-L", server.socket, "kill-server"], capture_output=True)


def shell_command(*args: str | Path) -> str:
    env = " ".join(f"{k}='{v}'" for k, v in rpack_env().items() if k != "PATH")
    words = " ".join(f"'{a}'" for a in args)
    return f"cd {REPO} && env {env} {sys.executable} -m rpack run {words}; sleep 30"


@pytest.fixture(scope="module")
def terminal_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("term")
    text = where / "numbers.txt"
    text.write_text("".join(f"line {n}\n" for n in range(1, 200)))
    out = where / "term.tar.zst"
    created = rpack("create", "--add", text, out, "/usr/bin/less", "/bin/bash")
    assert created.returncode == 0, created.stderr
    return out, text


def test_less_renders_with_the_packed_terminfo(tmux: Tmux,
                                               terminal_archive: tuple[Path, Path]) -> None:
    archive, text = terminal_archive
    tmux.start(shell_command(archive, text))
    screen = tmux.wait_for(lambda s: "line 23" in s)
    assert "not fully functional" not in screen
    assert screen.splitlines()[0] == "line 1"
    tmux("send-keys", "G")
    screen = tmux.wait_for(lambda s: "line 199" in s)
    assert "line 199" in screen and "line 1\n" not in screen
    tmux("send-keys", "q")


def test_interactive_bash_clears_the_screen(tmux: Tmux,
                                            terminal_archive: tuple[Path, Path]) -> None:
    archive, _ = terminal_archive
    tmux.start(shell_command("--entrypoint", "/bin/bash", archive, "--norc", "-i"))
    tmux.wait_for(lambda s: "$" in s or "#" in s)
    tmux("send-keys", "for i in 1 2 3 4 5; do echo filler$i; done", "Enter")
    tmux.wait_for(lambda s: "filler5" in s)
    # Ctrl-L is readline's clear-screen: it needs the terminal's "clear" capability.
    tmux("send-keys", "C-l")
    screen = tmux.wait_for(lambda s: "filler5" not in s, timeout=20)
    assert "filler5" not in screen
    tmux("send-keys", "exit 5", "Enter")


@pytest.fixture(scope="module")
def tools_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tools") / "tools.tar.zst"
    created = rpack("create", out, "/bin/sh", "/bin/cat", "/usr/bin/readlink", "/usr/bin/curl",
                    "/usr/bin/git")
    assert created.returncode == 0, created.stderr
    return out


def test_program_keeps_its_name_and_its_exe(tools_archive: Path) -> None:
    # peers.md 3, 3 and 4: the kernel's own comm and /proc/self/exe, no loader in between.
    done = rpack("run", tools_archive, "-c",
                 "cat /proc/$$/comm; readlink /proc/self/exe; exec cat /proc/self/comm")
    assert done.stdout == "sh\n/usr/bin/readlink\ncat\n", done.stderr


def test_git_sees_the_argv0_it_was_started_by(tools_archive: Path, tmp_path: Path) -> None:
    # peers.md 3, 1: a git that sees a mangled argv[0] takes it for a dashed built-in.
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    done = rpack("run", "--entrypoint", "/usr/bin/git", "--bind", f"{repo}:/work",
                 "--workdir", "/work", tools_archive, "status", "--short", "--branch")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("## No commits yet")


def test_loopback_http_reaches_a_host_server(tools_archive: Path, tmp_path: Path) -> None:
    # peers.md 3, 47: name resolution of localhost and a connection to the host's loopback.
    (tmp_path / "hello.txt").write_text("hello over http\n")
    server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1",
                               "--directory", str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True,
                              env={"PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"})
    try:
        assert server.stdout is not None
        port = server.stdout.readline().split("port ")[1].split()[0]
        for host in ("127.0.0.1", "localhost"):
            done = rpack("run", "--entrypoint", "/usr/bin/curl", tools_archive, "-sf",
                         f"http://{host}:{port}/hello.txt")
            assert (done.returncode, done.stdout) == (0, "hello over http\n"), done.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
