"""rpack run end to end, as root and as nobody: security.md's F and G cases, pipes, a terminal."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from conftest import RPACK, cli, rpack, rpack_env, run_cli

pytestmark = pytest.mark.root

MODES = ["root", "nobody"]


def start_cli(mode: str, *args: str | Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cli(mode, *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=rpack_env(), cwd=tempfile.gettempdir())


def mountinfo(mine: Path) -> list[str]:
    """The mount table, less what others mount in their own corners of a shared /tmp."""
    others = tempfile.gettempdir().rstrip("/") + "/"
    return sorted(line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if not line.split()[4].startswith(others)
                  or line.split()[4].startswith(f"{mine}/"))


def sleepers(seconds: str) -> list[int]:
    """Live processes running `sleep seconds` (a zombie has an empty command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == (
                    f"sleep\0{seconds}\0".encode()):
                found.append(int(entry.name))
    return found


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def unique(mode: str, tail: str) -> str:
    """A `sleep` argument no other test or run uses, so its processes can be found."""
    return f"{len(mode)}{os.getpid()}{tail}"


# --- archives ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """A sticky, world-writable directory: nobody cannot reach tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="rpack-run-test-"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path)


def create(shared: Path, name: str, *programs: str) -> Path:
    out = shared / name
    done = rpack("create", out, *programs)
    assert done.returncode == 0, done.stderr
    out.chmod(0o644)
    return out


@pytest.fixture(scope="module")
def sh(shared: Path) -> Path:
    return create(shared, "sh.tar.zst", "/bin/sh", "/bin/sleep", "/usr/bin/head", "/usr/bin/yes",
                  "/bin/cat", "/bin/ls", "/bin/mkdir", "/bin/chmod")


@pytest.fixture(scope="module")
def bash(shared: Path) -> Path:
    return create(shared, "bash.tar.zst", "/bin/bash", "/bin/sleep", "/bin/stty", "/usr/bin/tty")


Member = tuple[tarfile.TarInfo, bytes]


def read_members(archive: Path) -> list[Member]:
    with open(archive, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as stream:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            members = []
            for info in tar:
                data = tar.extractfile(info) if info.isfile() else None
                members.append((info, data.read() if data else b""))
            return members


def repack(archive: Path, out: Path, *, add: tuple[Member, ...] = (),
           drop: tuple[str, ...] = (), corrupt: str | None = None) -> Path:
    """A copy of an rpack archive with members added or left out and its manifest to match.

    The data of `corrupt` changes and its manifest entry does not.
    """
    head, *rest = read_members(archive)
    manifest = json.loads(head[1])
    entries = {entry["path"]: entry for entry in manifest["entries"]}
    members = {info.name: (info, data) for info, data in rest}
    for name in drop:
        del members[name], entries[name]
    for info, data in add:
        members[info.name] = (info, data)
        entries[info.name] = entry(info, data)
    if corrupt:
        info, data = members[corrupt]
        members[corrupt] = (info, bytes([data[0] ^ 1]) + data[1:])

    order = sorted(members, key=lambda name: name.encode())
    manifest["entries"] = [entries[name] for name in order]
    manifest["totals"] = {"entries": len(order),
                          "bytes": sum(entry.get("size", 0) for entry in manifest["entries"])}
    data = json.dumps(manifest, sort_keys=True).encode()
    head[0].size = len(data)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, content in [(head[0], data), *(members[name] for name in order)]:
            tar.addfile(info, io.BytesIO(content) if info.isfile() else None)
    out.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(raw.getvalue()))
    out.chmod(0o644)
    return out


def entry(info: tarfile.TarInfo, data: bytes) -> dict[str, object]:
    """The manifest's record of a member, as format.md section 4 has it."""
    if info.issym():
        return {"path": info.name, "type": "symlink", "mode": info.mode, "target": info.linkname}
    if info.islnk():
        return {"path": info.name, "type": "hardlink", "mode": info.mode,
                "target": info.linkname}
    if info.isdir():
        return {"path": info.name, "type": "dir", "mode": info.mode}
    return {"path": info.name, "type": "file", "mode": info.mode, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def hostile(out: Path, *members: Member) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    out.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(raw.getvalue()))
    out.chmod(0o644)
    return out


def regular(name: str, data: bytes, mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.mode, info.size, info.mtime = mode, len(data), 1_700_000_000
    return info, data


def symlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, 1_700_000_000
    return info, b""


def hardlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.LNKTYPE, target, 0o644, 1_700_000_000
    return info, b""


# --- the invariants I1 to I3 --------------------------------------------------------------------


@dataclass
class Host:
    """What a run must leave alone: a victim outside every root, the roots' base, the mounts."""

    shared: Path
    outside: Path
    victim: Path
    tmpdir: Path
    mounts: list[str]
    state: dict[str, tuple[int, int, bytes]]

    def snapshot(self) -> dict[str, tuple[int, int, bytes]]:
        """Each entry beside the victim: its mode, mtime and content (a directory's listing)."""
        def content(path: Path) -> bytes:
            return path.read_bytes() if path.is_file() else "/".join(os.listdir(path)).encode()

        return {p.name: (p.lstat().st_mode, p.lstat().st_mtime_ns, content(p))
                for p in self.outside.iterdir()}

    def roots(self) -> list[Path]:
        """The runs' directories, and the cache's unfinished builds and deletions.

        The cache itself, and the entries in it, outlive the runs on purpose (runner.cache).
        """
        runs = [path for path in self.tmpdir.glob("rpack-*/*") if path.name != "cache"]
        return sorted(runs + [*self.tmpdir.glob("rpack-*/cache/build-*"),
                              *self.tmpdir.glob("rpack-*/cache/trash-*")])

    def check(self, roots: int = 0) -> None:
        """I1: nothing outside the roots changed; I2: no root is left; I3: no mount either."""
        assert self.snapshot() == self.state
        assert len(self.roots()) == roots, self.roots()
        assert mountinfo(self.shared) == self.mounts


@pytest.fixture
def host(shared: Path) -> Iterator[Host]:
    outside = Path(tempfile.mkdtemp(dir=shared))
    outside.chmod(0o777)
    victim = outside / "victim"
    victim.write_text("victim\n")
    # Writable by anyone: only the sandbox stands between the program and this file.
    victim.chmod(0o666)
    tmpdir = Path(tempfile.mkdtemp(dir=shared))
    tmpdir.chmod(0o1777)
    state = Host(shared, outside, victim, tmpdir, [], {})
    state.state, state.mounts = state.snapshot(), mountinfo(shared)
    yield state
    shutil.rmtree(outside)
    shutil.rmtree(tmpdir)


# --- F: running and the sandbox -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("script", "status"), [
    ("exit 0", 0),
    ("echo ok; exit 7", 7),  # F57
    # F58: rpack ends of the same signal, which a shell shows as 143 and 130.
    ("kill -TERM $$", -signal.SIGTERM),
    ("kill -INT $$", -signal.SIGINT),
    ("exec /etc/ld.so.cache", 126),  # F68, with the shell's own message
    ("exec /no/such/program", 127),
], ids=["exit-0", "exit-7", "TERM", "INT", "not-executable", "not-in-the-root"])
def test_exit_status_passes_through(host: Host, sh: Path, mode: str, script: str,
                                    status: int) -> None:
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", script)
    assert done.returncode == status, done.stderr
    assert done.stdout == ("ok\n" if status == 7 else "")
    host.check()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("entrypoint", "status", "message"), [
    ("/etc/ld.so.cache", 126, "rpack: error: cannot execute /etc/ld.so.cache: Permission denied"),
    ("/usr/bin/nothere", 127, "rpack: error: /usr/bin/nothere: not found in the root"),
    ("nothere", 127, "rpack: error: nothere: not found in the root"),
], ids=["not-executable", "missing-path", "missing-name"])
def test_entrypoint_that_cannot_run(host: Host, sh: Path, mode: str, entrypoint: str,
                                    status: int, message: str) -> None:
    # F68: rpack itself execs these, so the message is its own.
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, "--entrypoint", entrypoint, sh)
    assert (done.returncode, done.stderr) == (status, message + "\n")
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_missing_loader_is_126_naming_the_program(host: Host, sh: Path, shared: Path,
                                                  mode: str) -> None:
    # F68: the program is there, its ELF interpreter is not.
    broken = repack(sh, shared / f"noloader-{mode}.tar.zst",
                    drop=("usr/lib64/ld-linux-x86-64.so.2",
                          "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"))
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, broken, "-c", "true")
    assert done.returncode == 126
    assert done.stderr == ("rpack: error: cannot execute /bin/sh: its interpreter is missing "
                           "from the root\n")
    host.check()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("sig", "script"), [
    (signal.SIGTERM, "exec sleep {}"), (signal.SIGINT, "exec sleep {}"),
    # Off a terminal as on one, the keyboard's signals reach the program's process group:
    # sh's sleep as well, without which sh would wait for it.
    (signal.SIGINT, "sleep {}; echo after"), (signal.SIGQUIT, "sleep {}; echo after"),
], ids=["TERM", "INT", "INT-child", "QUIT-child"])
def test_signal_to_rpack_ends_the_program(host: Host, sh: Path, mode: str,
                                          sig: signal.Signals, script: str) -> None:
    # F59: passed on to the program, which dies of it; rpack says so and cleans up.
    seconds = unique(mode, f".{sig}{len(script)}")
    process = start_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c",
                        "echo started; " + script.format(seconds))
    assert process.stdout is not None
    assert process.stdout.readline() == b"started\n"
    assert wait_for(lambda: len(sleepers(seconds)) == 1)
    process.send_signal(sig)
    # rpack ends of the signal that ended the program, as the program would have: a shell's
    # $? is 128+N and a loop running it stops. Not of SIGQUIT, which would dump its core.
    assert process.wait(timeout=30) == (128 + sig if sig == signal.SIGQUIT else -sig)
    assert process.stdout.read() == b""
    assert not sleepers(seconds)
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_program_ignoring_sigterm_is_killed_after_the_grace_period(host: Host, sh: Path,
                                                                   mode: str) -> None:
    process = start_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c",
                        "trap '' TERM; echo started; while :; do sleep 1; done")
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline() == b"started\n"
    process.send_signal(signal.SIGTERM)
    # The grace period is 10 s; anything under a minute shows that it ended.
    assert process.wait(timeout=60) == 128 + signal.SIGKILL
    assert b"still ran 10 s after SIGTERM, so it was killed" in process.stderr.read()
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_to_rpack_leaves_a_root_that_the_next_run_sweeps(host: Host, sh: Path,
                                                                 mode: str) -> None:
    # F61, G79: nothing of the sandbox survives; the root stays until the next run.
    seconds = unique(mode, ".5")
    process = start_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c",
                        f"sleep {seconds} & echo started; exec sleep {seconds}")
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"started\n"
        assert wait_for(lambda: len(sleepers(seconds)) == 2)
        process.kill()
        assert process.wait(timeout=10) == -signal.SIGKILL
        assert wait_for(lambda: not sleepers(seconds))
        host.check(roots=1)

        done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", "echo next")
        assert (done.returncode, done.stdout) == (0, "next\n")
        host.check()
    finally:
        if process.poll() is None:
            process.kill()
        for pid in sleepers(seconds):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", MODES)
def test_root_of_a_live_run_is_not_swept(host: Host, sh: Path, mode: str) -> None:
    # G79: a root whose lock is held by a live run stays.
    process = start_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", "echo started; sleep 60")
    assert process.stdout is not None
    assert process.stdout.readline() == b"started\n"
    live = host.roots()
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", "echo other")
    assert (done.returncode, done.stdout) == (0, "other\n")
    assert host.roots() == live and len(live) == 1
    process.terminate()
    assert process.wait(timeout=30) == -signal.SIGTERM
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_background_processes_end_with_the_program(host: Host, sh: Path, mode: str) -> None:
    # F62
    seconds = unique(mode, ".25")
    began = time.monotonic()
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c",
                   f"sleep {seconds} & sleep {seconds} & exit 0")
    assert done.returncode == 0
    assert time.monotonic() - began < 30
    assert wait_for(lambda: not sleepers(seconds))
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_program_sees_only_its_own_processes_and_root(host: Host, sh: Path, mode: str) -> None:
    # F64: /proc is the sandbox's; no /proc/N/root or path leads to the host.
    script = (f"echo /proc/[0-9]*; [ -e /proc/1/root{host.victim} ] || echo hidden; "
              f"[ -e {host.victim} ] || echo absent; cat /proc/2/root/etc/ld.so.cache >/dev/null "
              "&& echo own root")
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", script)
    assert (done.returncode, done.stdout) == (0, "/proc/1 /proc/2\nhidden\nabsent\nown root\n")
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_dev_is_fresh_whatever_the_archive_holds(host: Host, sh: Path, shared: Path,
                                                 mode: str) -> None:
    # F67: the archive's regular file dev/null is hidden under a tmpfs with the host's null.
    archive = repack(sh, shared / f"devnull-{mode}.tar.zst",
                     add=(regular("dev/null", b"the archive's null\n"),))
    script = "echo written > /dev/null; [ -c /dev/null ] && echo device; echo $(ls /dev)"
    done = run_cli(mode, "run", "--keep", "--tmpdir", host.tmpdir, archive, "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("device\nfd full null ptmx pts random shm stderr stdin stdout tty "
                           "urandom zero\n")
    said = re.fullmatch(r"rpack: the root stays at (\S+)\n", done.stderr)
    assert said, done.stderr
    kept = Path(said[1])
    assert (kept / "dev/null").read_bytes() == b"the archive's null\n"
    shutil.rmtree(kept)
    host.check()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["proc", "dev"])
def test_mount_point_that_is_a_symlink_is_refused(host: Host, sh: Path, shared: Path, mode: str,
                                                  name: str) -> None:
    # `proc -> /` or `dev -> /etc` must not aim a mount at the host; the decoy stands in.
    decoy = host.outside / "decoy"
    archive = repack(sh, shared / f"{name}-link-{mode}.tar.zst", add=(symlink(name, str(decoy)),))
    decoy.mkdir()
    decoy.chmod(0o777)
    host.state = host.snapshot()
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, archive, "-c", "echo ran")
    assert (done.returncode, done.stdout) == (125, "")
    assert done.stderr == (f"rpack: error: refusing to run: /{name} in the root is a symlink "
                           f"to {decoy}, not a directory\nrpack: hint: /{name} must be a plain "
                           "directory in the archive\n")
    assert list(decoy.iterdir()) == []
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_whatever_the_program_leaves_is_deleted(host: Host, sh: Path, mode: str) -> None:
    # A tree 3000 deep (too deep to name in PATH_MAX bytes), and directories nobody may write.
    script = ("p=d; i=1; while [ $i -lt 1000 ]; do p=$p/d; i=$((i+1)); done; cd /tmp; "
              "for part in 1 2 3; do mkdir -p $p && cd -P $p || exit 9; done; cd /tmp; "
              "mkdir -p ro/none/deeper && chmod 0 ro/none && chmod 500 ro && chmod 0 / && "
              "echo built")
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", script)
    assert (done.returncode, done.stdout) == (0, "built\n"), done.stderr
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_program_gets_only_the_standard_descriptors(host: Host, sh: Path, mode: str) -> None:
    # F70: ls opens the fourth itself.
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", "ls /proc/self/fd")
    assert (done.returncode, done.stdout) == (0, "0\n1\n2\n3\n")
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_no_new_privileges_and_the_user_namespace(host: Host, sh: Path, mode: str) -> None:
    # F73
    script = ("while read k v; do [ $k = NoNewPrivs: ] && echo $k $v; done < /proc/self/status; "
              "for f in uid_map gid_map setgroups; do read -r m < /proc/self/$f; echo $m; done")
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", script)
    maps = ("0 65534 1\n0 65534 1\ndeny\n" if mode == "nobody"
            else "0 0 4294967295\n0 0 4294967295\nallow\n")
    assert (done.returncode, done.stdout) == (0, "NoNewPrivs: 1\n" + maps)
    host.check()


SECCOMP_C = r"""
/* Runs a program where unshare(2) and clone(2) with CLONE_NEWUSER fail with EPERM, as they
   do with kernel.unprivileged_userns_clone=0; clone3 says ENOSYS so libc falls back. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#if defined(__x86_64__)
#define ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define ARCH AUDIT_ARCH_AARCH64
#endif

int main(int argc, char **argv) {
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone3, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_unshare, 1, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_NEWUSER, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof(filter) / sizeof(filter[0]), filter};
    if (argc < 2 || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
        return perror("no-userns"), 125;
    execv(argv[1], argv + 1);
    return perror(argv[1]), 127;
}
"""


@pytest.fixture(scope="module")
def no_userns(shared: Path) -> str:
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler (gcc) on this machine")
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("the seccomp filter knows x86_64 and aarch64 only")
    (shared / "no-userns.c").write_text(SECCOMP_C)
    subprocess.run(["gcc", "-O1", "-o", str(shared / "no-userns"), str(shared / "no-userns.c")],
                   check=True, capture_output=True)
    return str(shared / "no-userns")


def test_user_namespaces_refused(host: Host, sh: Path, no_userns: str) -> None:
    # F72: one clear message before anything is unpacked, exit 125, nothing left.
    done = run_cli("nobody", "run", "--tmpdir", host.tmpdir, sh, "-c", "echo ran",
                   prefix=(no_userns,))
    assert done.returncode == 125
    assert done.stdout == ""
    assert done.stderr == ("rpack: error: user namespaces are not available (Operation not "
                           "permitted)\nrpack: hint: unprivileged user namespaces are probably "
                           "disabled (sysctl kernel.unprivileged_userns_clone=0, "
                           "user.max_user_namespaces=0, an AppArmor restriction such as "
                           "kernel.apparmor_restrict_unprivileged_userns=1, or a seccomp filter "
                           "of a container); enable them, or run rpack as root\n")
    assert list(host.tmpdir.iterdir()) == []
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_noexec_base_is_reported_before_unpacking(host: Host, sh: Path, mode: str) -> None:
    # F74, in a mount namespace of its own that ends with the test's process.
    mount = 'mount -t tmpfs -o noexec,mode=1777 rpack-test "$0" && exec "$@"'
    prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c", mount,
              str(host.tmpdir))
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", "echo ran", prefix=prefix)
    assert done.returncode == 125
    assert done.stderr == (f"rpack: error: the temporary directory {host.tmpdir} is on a noexec "
                           "filesystem, where no program can run\nrpack: hint: choose another "
                           "place with --tmpdir or TMPDIR\n")
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_manifest_symlink_is_refused(host: Host, shared: Path, mode: str) -> None:
    # F75: the host never opens what the link names.
    link = tarfile.TarInfo(".rpack/manifest.json")
    link.type, link.linkname = tarfile.SYMTYPE, str(host.victim)
    archive = hostile(shared / f"manifest-link-{mode}.tar.zst", (link, b""))
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, archive)
    assert done.returncode == 125
    assert done.stderr == ("rpack: error: member '.rpack/manifest.json': manifest must be a "
                           "regular file\n")
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_archive_refused_halfway_leaves_nothing(host: Host, sh: Path, shared: Path,
                                                mode: str) -> None:
    # G80: most of the root was unpacked when the last file failed its checksum.
    archive = repack(sh, shared / f"corrupt-{mode}.tar.zst",
                     corrupt="usr/lib/x86_64-linux-gnu/libc.so.6")
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, archive, "-c", "echo ran")
    assert done.returncode == 125
    assert done.stdout == ""
    assert "usr/lib/x86_64-linux-gnu/libc.so.6" in done.stderr
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_refused_archive_writes_nothing_outside(host: Host, shared: Path, mode: str) -> None:
    archive = hostile(shared / f"absolute-{mode}.tar.zst", regular(str(host.victim), b"pwned"))
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, archive)
    assert done.returncode == 125
    assert done.stderr.startswith("rpack: error: ")
    host.check()


# --- pipes, options, the terminal -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_pipes_pass_through_untouched(host: Host, sh: Path, mode: str) -> None:
    command = shlex.join(cli(mode, "run", "--tmpdir", host.tmpdir, sh))
    for pipeline, status in [
        (f"yes | {command} -c 'head -1'", 0),
        (f"{command} -c 'yes | head -1'", 0),
        (f"{command} -c 'yes' | head -1; exit ${{PIPESTATUS[0]}}", 128 + signal.SIGPIPE),
        (f"printf 'y\\n' | {command} -c 'cat'", 0),
    ]:
        done = subprocess.run(["bash", "-c", pipeline], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, env=rpack_env(), timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (status, "y\n", ""), pipeline
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_bind_env_workdir_and_keep(host: Host, sh: Path, mode: str) -> None:
    data = host.tmpdir / "data"
    data.mkdir()
    data.chmod(0o777)
    script = ("pwd; echo $GREETING; cat /host/victim; echo x >> /host/victim || echo read-only; "
              "echo made > /data/new")
    # The base for roots comes from TMPDIR here.
    done = run_cli(mode, "run", "--keep", "--env", "GREETING=hello",
                   "--workdir", "/tmp", "--bind", f"{host.outside}:/host:ro",
                   "--bind", f"{data}:/data", "--entrypoint", "/bin/sh", sh, "-c",
                   f"{{ {script}; }} 2>/dev/null", env={"TMPDIR": str(host.tmpdir)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "/tmp\nhello\nvictim\nread-only\n"
    assert (data / "new").read_text() == "made\n"
    (root,) = host.roots()
    assert done.stderr == f"rpack: the root stays at {root}\n"
    assert root.name.startswith("keep-") and (root / "host").is_dir()
    # A kept root is never swept.
    assert run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", "true").returncode == 0
    assert host.roots() == [root]
    shutil.rmtree(root)
    shutil.rmtree(data)
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_bind_of_a_missing_path_fails_before_unpacking(host: Host, sh: Path, mode: str) -> None:
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, "--bind", f"{host.outside}/none:/x", sh)
    assert (done.returncode, done.stderr) == (
        125, f"rpack: error: cannot bind {host.outside}/none: No such file or directory\n")
    host.check()


class Tmux:
    """A tmux server of the test's own, with one window of 80x24."""

    def __init__(self, name: str) -> None:
        self.command = ["tmux", "-L", name, "-f", "/dev/null"]

    def __call__(self, *args: str) -> str:
        return subprocess.run([*self.command, *args], check=True, capture_output=True,
                              text=True, env=rpack_env(), timeout=30).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "rpack")

    def wait(self, pattern: str, timeout: float = 30) -> str:
        """The screen, once `pattern` matches it."""
        found = wait_for(lambda: re.search(pattern, self.screen(), re.M) is not None, timeout)
        assert found, f"no {pattern!r} on the screen:\n{self.screen()}"
        return self.screen()

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", "rpack", *keys)


@pytest.mark.parametrize("mode", MODES)
def test_interactive_bash_through_tmux(host: Host, bash: Path, mode: str) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (Debian: apt-get install tmux)")
    seconds = unique(mode, "9")
    status = host.tmpdir / "status"
    command = shlex.join(cli(mode, "run", "--tmpdir", host.tmpdir, bash))
    tmux = Tmux(f"rpack-test-{os.getpid()}-{mode}")
    tmux("new-session", "-d", "-s", "rpack", "-x", "80", "-y", "24",
         f"{command}; echo $? > {status}; sleep 60")
    try:
        prompt = r"^bash-[0-9.]+#$"  # capture-pane drops the trailing space
        tmux.wait(prompt)
        tmux.keys("tty; stty size", "Enter")
        tmux.wait(r"^/dev/pts/0\n24 80$")

        # Job control: Ctrl-Z stops the foreground job, fg brings it back, Ctrl-C ends it.
        tmux.keys(f"sleep {seconds}", "Enter")
        assert wait_for(lambda: len(sleepers(seconds)) == 1)
        tmux.keys("C-z")
        tmux.wait(rf"^\[1\]\+ +Stopped +sleep {seconds}$")
        tmux.keys("fg", "Enter")
        tmux.wait(rf"# fg\nsleep {seconds}$")
        tmux.keys("C-c")
        tmux.wait(r"^\^C\n" + prompt[1:])
        tmux.keys("echo status=$? jobs=$(jobs -p)", "Enter")
        tmux.wait(r"^status=130 jobs=$")
        assert wait_for(lambda: not sleepers(seconds))

        # A new window size reaches the program.
        tmux("resize-window", "-t", "rpack", "-x", "100", "-y", "30")
        tmux.keys("stty size", "Enter")
        tmux.wait(r"^30 100$")

        tmux.keys("exit 5", "Enter")
        assert wait_for(lambda: status.exists() and status.read_text() == "5\n", 30)
        assert "rpack:" not in tmux.screen()
    finally:
        tmux("kill-server")
    status.unlink()
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_a_run_in_the_background_of_a_terminal_is_not_stopped(host: Host, sh: Path,
                                                                mode: str) -> None:
    # `rpack run ... &` from an interactive shell: the terminal is not its to take over.
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (Debian: apt-get install tmux)")
    command = shlex.join(cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c",
                             "echo bgout; sleep 1; echo bgdone"))
    tmux = Tmux(f"rpack-test-{os.getpid()}-bg-{mode}")
    tmux("new-session", "-d", "-s", "rpack", "-x", "80", "-y", "24", "bash --norc -i")
    try:
        tmux.wait(r"^bash-[0-9.]+#$")
        tmux.keys(f"{command} & wait $!; echo status=$?", "Enter")
        assert "\nbgout\nbgdone\n" in tmux.wait(r"^status=0$")
    finally:
        tmux("kill-server")
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_closed_standard_streams(host: Host, sh: Path, mode: str) -> None:
    # Closed, rpack's stdout becomes /dev/null for the program, never a file rpack opened.
    command = cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c",
                  # fd 3 keeps what fd 1 was: dash moves fd 1 while running ls >&2.
                  "exec 3>&1; ls -l /proc/$$/fd/3 >&2; echo to-nowhere")
    done = subprocess.run(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=rpack_env(), cwd=tempfile.gettempdir(), timeout=60,
                          preexec_fn=lambda: os.close(1))
    assert done.returncode == 0, done.stderr
    assert re.search(r"/fd/3 -> /dev/null$", done.stderr, re.M), done.stderr
    # Reading the archive from a closed standard input is refused.
    done = subprocess.run(cli(mode, "run", "--tmpdir", host.tmpdir, "-", "-c", "true"),
                          capture_output=True, text=True,
                          env=rpack_env(), cwd=tempfile.gettempdir(), timeout=60,
                          preexec_fn=lambda: os.close(0))
    assert (done.returncode, done.stderr) == (
        125, "rpack: error: standard input is closed: no archive to read\n")
    host.check()


def test_shipping_through_a_pipe() -> None:
    command = f"{shlex.join(RPACK)} create - /bin/sh | {shlex.join(RPACK)} run - -c 'echo piped'"
    done = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, env=rpack_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "piped\n"


PROGRAMS = [
    (["/bin/bash"], [], ["-c", "echo $((6 * 7))"], "42"),
    (["/bin/ls"], [], ["-la", "/"], "lib64 -> usr/lib64"),
    (["/usr/bin/git"], [], ["--version"], "git version"),
    # gdb embeds Python, which aborts at start-up without the standard library rpack adds.
    (["/usr/bin/gdb"], [], ["--version"], "GNU gdb"),
    (["/usr/bin/cmake"], [], ["--version"], "cmake version"),
    (["/usr/bin/perl"], [], ["-e", "print 1"], "1"),
    (["/usr/bin/python3"], ["--add", "/usr/lib/python3.11"],
     ["-c", "import json; print(json.dumps({'ok': 1}))"], '{"ok": 1}'),
]


@pytest.mark.heavy
@pytest.mark.parametrize(("programs", "options", "args", "expected"), PROGRAMS,
                         ids=[os.path.basename(p[0][0]) for p in PROGRAMS])
def test_real_programs_run_in_their_root(programs: list[str], options: list[str],
                                         args: list[str], expected: str,
                                         tmp_path: Path) -> None:
    out = tmp_path / "prog.tar.zst"
    created = rpack("create", *options, str(out), *programs)
    assert created.returncode == 0, created.stderr
    done = run_cli("root", "run", out, *args)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


def test_everything_after_the_archive_goes_to_the_program(tmp_path: Path) -> None:
    out = tmp_path / "echo.tar.zst"
    assert rpack("create", str(out), "/bin/echo").returncode == 0
    assert rpack("run", str(out), "--", "a", "b").stdout == "-- a b\n"
    assert rpack("run", str(out), "-n", "x").stdout == "x"


PROBE = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
static void report(const char *what, int r) { printf("%s %s\n", what, r ? strerror(errno) : "ok"); }
int main(void) {
    /* No-op changes: they succeed or fail as real ones would, and harm nothing if the
       sandbox were broken, since /dev/null is the host's own node. */
    struct stat st;
    if (stat("/dev/null", &st) != 0)
        return 2;
    report("chmod-dev-null", chmod("/dev/null", st.st_mode & 07777));
    report("chown-dev-null", chown("/dev/null", (uid_t)-1, (gid_t)-1));
    report("remount-ro-bind", mount(NULL, "/ro", NULL, MS_REMOUNT | MS_BIND, NULL));
    report("umount-ro-bind", umount2("/ro", MNT_DETACH));
    FILE *f = fopen("/ro/planted", "w");
    printf("write-ro-bind %s\n", f ? "ok" : strerror(errno));
    FILE *null = fopen("/dev/null", "w");
    printf("write-dev-null %s\n", null && fputs("x", null) >= 0 ? "ok" : strerror(errno));
    return 0;
}
"""


@pytest.fixture(scope="module")
def probe(shared: Path) -> Path:
    source = shared / "probe.c"
    source.write_text(PROBE)
    subprocess.run(["gcc", "-static", "-o", str(shared / "probe"), str(source)], check=True)
    return create(shared, "probe.tar.zst", str(shared / "probe"))


@pytest.mark.parametrize("mode", MODES)
def test_program_cannot_change_host_devices_or_lift_a_read_only_bind(host: Host, probe: Path,
                                                                       mode: str) -> None:
    before = os.stat("/dev/null")
    ro = host.outside / "ro"
    ro.mkdir()
    ro.chmod(0o777)
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, "--bind", f"{ro}:/ro:ro", probe)
    assert done.returncode == 0, done.stderr
    results = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert results["write-dev-null"] == "ok"
    for what in ("chmod-dev-null", "chown-dev-null", "remount-ro-bind", "umount-ro-bind",
                 "write-ro-bind"):
        assert results[what] != "ok", (what, results)
    after = os.stat("/dev/null")
    assert (after.st_mode, after.st_uid, after.st_ctime_ns) == \
        (before.st_mode, before.st_uid, before.st_ctime_ns)
    assert list(ro.iterdir()) == []
    ro.rmdir()
    host.check()


@pytest.mark.heavy
@pytest.mark.parametrize("command", ["run", "extract"])
def test_sigterm_while_unpacking_leaves_nothing(host: Host, shared: Path, command: str) -> None:
    big = shared / f"big-{command}"
    with open(big, "wb") as f:
        f.truncate(600 << 20)
    archive = shared / f"big-{command}.tar.zst"
    created = rpack("create", "--add", big, archive, "/bin/sh")
    big.unlink()
    assert created.returncode == 0, created.stderr
    dest = host.tmpdir / "extracted"
    args = ["run", "--tmpdir", host.tmpdir, archive, "-c", "true"] if command == "run" \
        else ["extract", archive, dest]
    process = start_cli("root", *args)
    started = wait_for(lambda: bool(host.roots()) or dest.exists(), timeout=60)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    archive.unlink()
    assert started
    assert process.returncode == -signal.SIGTERM, stderr
    assert b"terminated by SIGTERM" in stderr
    assert not dest.exists()
    host.check()


@pytest.mark.root
def test_a_program_that_drops_to_another_uid_can_use_the_root(host: Host, shared: Path) -> None:
    source = shared / "drop.c"
    source.write_text(r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    if (setgid(65534) || setuid(65534)) return 2;
    FILE *f = fopen("/dev/null", "w");
    puts(f && access("/tmp", W_OK) == 0 ? "usable" : "unusable");
    return 0;
}
""")
    subprocess.run(["gcc", "-static", "-o", str(shared / "drop"), str(source)], check=True)
    archive = create(shared, "drop.tar.zst", str(shared / "drop"))
    done = run_cli("root", "run", "--tmpdir", host.tmpdir, archive)
    assert (done.returncode, done.stdout) == (0, "usable\n"), done.stderr
    host.check()
