"""rpack run's cache of unpacked roots: overlays per run, damage found, locks, eviction, clean."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import NOBODY, cli, rpack, rpack_env, run_cli
from test_run import (
    MODES,
    Host,
    create,
    host,
    sh,
    shared,
    start_cli,
    wait_for,
)

pytestmark = pytest.mark.root

__all__ = ["host", "sh", "shared"]  # fixtures, shared with test_run

Tree = dict[str, tuple[int, bytes]]


def tree(root: Path) -> Tree:
    """Each path below root: its mode, and a file's sha256 or a symlink's target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(path).encode()
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(path.read_bytes()).digest()
            else:
                what = b""
            found[str(path.relative_to(root))] = (st.st_mode, what)
    return found


@pytest.fixture(scope="module")
def extracted(shared: Path, sh: Path) -> Path:
    """The sh archive as rpack extract unpacks it."""
    dest = shared / "sh-extracted"
    done = rpack("extract", sh, dest)
    assert done.returncode == 0, done.stderr
    return dest


@pytest.fixture(scope="module")
def unpacked(extracted: Path) -> Tree:
    """What a cached root of the sh archive must hold."""
    return tree(extracted)


def cache_dir(host: Host, mode: str) -> Path:
    return host.tmpdir / f"rpack-{0 if mode == 'root' else NOBODY}" / "cache"


def entries(host: Host, mode: str) -> list[Path]:
    return sorted(cache_dir(host, mode).glob("sha256-*"))


def run_ok(mode: str, host: Host, archive: Path, script: str, *options: str) -> str:
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, *options, archive, "-c", script)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("mode", MODES)
def test_writes_reach_neither_the_cache_nor_another_run(host: Host, sh: Path, extracted: Path,
                                                        unpacked: Tree, mode: str) -> None:
    script = ("echo mine > /tmp/mine; echo more >> /etc/ld.so.cache; : > /usr/bin/head; "
              "chmod 700 /usr/bin/cat; mkdir /new; echo wrote")
    assert run_ok(mode, host, sh, script) == "wrote\n"
    (entry,) = entries(host, mode)
    # The generated /etc/passwd and /etc/group went to the run's upper layer too.
    assert tree(entry / "root") == unpacked

    script = ("for p in /tmp/mine /new; do [ -e $p ] && echo $p; done; echo head | head -1; "
              "ls -ln /etc/ld.so.cache /usr/bin/cat")
    head, cache, cat = run_ok(mode, host, sh, script).splitlines()
    assert head == "head"
    assert cache.split()[4] == str((extracted / "etc/ld.so.cache").stat().st_size)
    assert cat.startswith("-rwxr-xr-x ")
    assert tree(entry / "root") == unpacked
    assert entries(host, mode) == [entry]
    host.check()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damage", ["rewritten", "deleted", "added", "chmod"])
def test_damaged_entry_is_detected_and_rebuilt(host: Host, sh: Path, unpacked: Tree, mode: str,
                                               damage: str) -> None:
    assert run_ok(mode, host, sh, "echo first") == "first\n"
    (entry,) = entries(host, mode)
    dash = entry / "root/usr/bin/dash"
    if damage == "rewritten":
        # Same size, same mtime: only the inode's change time tells.
        before = dash.stat()
        data = bytearray(dash.read_bytes())
        data[100] ^= 0xFF
        dash.write_bytes(bytes(data))
        os.utime(dash, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif damage == "deleted":
        dash.unlink()
    elif damage == "added":
        (entry / "root/usr/bin/planted").write_text("planted\n")
    else:
        dash.chmod(0o4755)
    assert tree(entry / "root") != unpacked

    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", "echo second")
    assert (done.returncode, done.stdout) == (0, "second\n"), done.stderr
    identity = entry.name.removeprefix("sha256-")
    path = {"added": "/usr/bin/planted appeared",
            "deleted": "/usr/bin/dash is missing"}.get(damage, "/usr/bin/dash changed")
    assert done.stderr == (f"rpack: warning: the cached root of sha256:{identity} is damaged "
                           f"({path}): unpacking the archive again\n")
    assert entries(host, mode) == [entry]
    assert tree(entry / "root") == unpacked
    # Rebuilt once: the next run uses it quietly.
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", "echo third")
    assert (done.returncode, done.stdout, done.stderr) == (0, "third\n", "")
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_damaged_records_are_detected_too(host: Host, sh: Path, unpacked: Tree,
                                          mode: str) -> None:
    run_ok(mode, host, sh, "true")
    (entry,) = entries(host, mode)
    (entry / "stamp.json").write_text("{")
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", "echo ran")
    assert (done.returncode, done.stdout) == (0, "ran\n"), done.stderr
    assert "is damaged (its records are unreadable: " in done.stderr
    assert tree(entry / "root") == unpacked
    assert json.loads((entry / "stamp.json").read_text())["records"]
    host.check()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
def test_two_runs_of_one_archive_at_once(host: Host, sh: Path, unpacked: Tree, mode: str,
                                         cold: bool) -> None:
    if not cold:
        run_ok(mode, host, sh, "true")
    # Each writes its own file where the other would see it, were the roots shared.
    script = "echo {0} > /tmp/who; echo started; sleep 2; cat /tmp/who; ls /tmp"
    first = start_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", script.format("first"))
    second = start_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", script.format("second"))
    outputs = [process.communicate(timeout=120) for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], outputs
    assert [out for out, _ in outputs] == [b"started\nfirst\nwho\n", b"started\nsecond\nwho\n"]
    (entry,) = entries(host, mode)
    assert tree(entry / "root") == unpacked
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_no_cache_and_keep_leave_no_entry(host: Host, sh: Path, mode: str) -> None:
    assert run_ok(mode, host, sh, "echo ran", "--no-cache") == "ran\n"
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, "--keep", sh, "-c", "true")
    assert done.returncode == 0, done.stderr
    (kept,) = host.roots()
    assert (kept / "usr/bin/dash").is_file()
    assert entries(host, mode) == []
    shutil.rmtree(kept)
    host.check()


def test_an_archive_from_a_pipe_is_not_cached(host: Host, sh: Path) -> None:
    done = subprocess.run(cli("root", "run", "--tmpdir", host.tmpdir, "-", "-c", "echo piped"),
                          input=sh.read_bytes(), capture_output=True, env=rpack_env(),
                          timeout=120)
    assert (done.returncode, done.stdout) == (0, b"piped\n"), done.stderr
    assert entries(host, "root") == []
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_the_cache_follows_the_archive_file(host: Host, shared: Path, mode: str) -> None:
    archive = create(shared, f"changing-{mode}.tar.zst", "/bin/sh")
    assert run_ok(mode, host, archive, "echo /usr/bin/*") == "/usr/bin/dash /usr/bin/sh\n"
    # Replaced at the same path: another identity, another entry.
    archive = create(shared, f"changing-{mode}.tar.zst.new", "/bin/sh", "/bin/ls")
    archive.rename(shared / f"changing-{mode}.tar.zst")
    archive = shared / f"changing-{mode}.tar.zst"
    shown = run_ok(mode, host, archive, "echo /usr/bin/*")
    assert shown == "/usr/bin/dash /usr/bin/ls /usr/bin/sh\n"
    assert len(entries(host, mode)) == 2
    # Touched only: the same identity, found again after one pass over the file.
    os.utime(archive)
    assert run_ok(mode, host, archive, "echo /usr/bin/*") == shown
    assert len(entries(host, mode)) == 2
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_cache_list_and_clean(host: Host, sh: Path, mode: str) -> None:
    run_ok(mode, host, sh, "true")
    (entry,) = entries(host, mode)
    listed = run_cli(mode, "cache", "list", "--tmpdir", host.tmpdir)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith(entry.name + " ") and "in use" not in listed.stdout

    # An entry in use stays.
    process = start_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", "echo started; sleep 60")
    assert process.stdout is not None
    assert process.stdout.readline() == b"started\n"
    listed = run_cli(mode, "cache", "list", "--tmpdir", host.tmpdir)
    assert listed.stdout.rstrip().endswith("  in use")
    done = run_cli(mode, "cache", "clean", "--tmpdir", host.tmpdir)
    assert (done.returncode, done.stdout) == (0, "removed 0 cached roots; 1 in use stay\n")
    assert entries(host, mode) == [entry]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == -signal.SIGTERM

    done = run_cli(mode, "cache", "clean", "--tmpdir", host.tmpdir)
    assert (done.returncode, done.stdout) == (0, "removed 1 cached roots\n")
    assert entries(host, mode) == []
    assert list((cache_dir(host, mode) / "keys").iterdir()) == []
    host.check()


def disk_bytes(entry: Path) -> int:
    return int(json.loads((entry / "entry.json").read_text())["disk_bytes"])


@pytest.mark.parametrize("mode", MODES)
def test_size_limit_evicts_the_least_recently_used(host: Host, sh: Path, shared: Path,
                                                   mode: str) -> None:
    archives = [sh, create(shared, f"ls-{mode}.tar.zst", "/bin/sh", "/bin/ls"),
                create(shared, f"mkdir-{mode}.tar.zst", "/bin/sh", "/bin/mkdir")]
    made = []
    for archive in archives:
        run_ok(mode, host, archive, "true")
        (entry,) = set(entries(host, mode)) - set(made)
        made.append(entry)
    sizes = [disk_bytes(entry) for entry in made]
    run_cli(mode, "cache", "clean", "--tmpdir", host.tmpdir)

    # The first is used again after the second; the third leaves room for one of them.
    for archive in (archives[0], archives[1], archives[0]):
        run_ok(mode, host, archive, "true")
    limit = sizes[0] + sizes[2] + sizes[1] // 2
    run_ok(mode, host, archives[2], "true", "--cache-size", str(limit))
    assert entries(host, mode) == sorted([made[0], made[2]])

    # Less room than one root: it is used for the run, and not kept.
    run_cli(mode, "cache", "clean", "--tmpdir", host.tmpdir)
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, sh, "-c", "echo ran",
                   env={"RPACK_CACHE_SIZE": "1M"})
    assert (done.returncode, done.stdout, done.stderr) == (0, "ran\n", "")
    assert entries(host, mode) == []
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_eviction_spares_an_entry_in_use(host: Host, sh: Path, shared: Path, mode: str) -> None:
    other = create(shared, f"spare-{mode}.tar.zst", "/bin/sh", "/bin/ls")
    sync = host.tmpdir / "sync"
    sync.mkdir(mode=0o777)
    sync.chmod(0o777)
    process = start_cli(mode, "run", "--tmpdir", host.tmpdir, "--bind", f"{sync}:/sync", sh,
                        "-c", "echo started; while [ ! -e /sync/go ]; do sleep 0.1; done; "
                        "echo /usr/bin/h*")
    assert process.stdout is not None
    assert process.stdout.readline() == b"started\n"
    (used,) = entries(host, mode)
    run_ok(mode, host, other, "true", "--cache-size", "1")
    assert used in entries(host, mode)
    (sync / "go").touch()
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out) == (0, b"/usr/bin/head\n"), err
    assert (used / "root/usr/bin/head").is_file()
    shutil.rmtree(sync)
    host.check()


def test_bad_cache_size_variable_is_an_error(host: Host, sh: Path) -> None:
    done = run_cli("root", "run", "--tmpdir", host.tmpdir, sh, "-c", "true",
                   env={"RPACK_CACHE_SIZE": "lots"})
    assert (done.returncode, done.stderr) == (
        125, "rpack: error: $RPACK_CACHE_SIZE: expected a size such as 512M or 2G, got 'lots'\n")
    host.check()


def test_limits_and_trust_setuid_apply_to_cached_roots(host: Host, sh: Path) -> None:
    run_ok("root", host, sh, "true")
    (entry,) = entries(host, "root")
    # Judged by the counts taken at unpacking; the archive is then read, and refused.
    done = run_cli("root", "run", "--tmpdir", host.tmpdir, "--max-members", "3", sh, "-c", "true")
    assert done.returncode == 125
    assert done.stderr.startswith("rpack: error: ") and "too many members" in done.stderr
    assert entries(host, "root") == [entry]
    # A root unpacked with its setuid bits is another root.
    run_ok("root", host, sh, "true", "--trust-setuid")
    assert entries(host, "root") == [entry, entry.with_name(entry.name + "-setuid")]
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_without_overlays_each_run_unpacks_its_own_root(host: Host, sh: Path, mode: str) -> None:
    # overlayfs refuses an upper layer on overlayfs: here the temporary directory is one, in a
    # mount namespace that ends with the run.
    layers = {name: host.tmpdir / name for name in ("lower", "upper", "work", "merged")}
    for path in layers.values():
        path.mkdir()
        path.chmod(0o1777)
    options = ",".join(f"{name}dir={layers[name]}" for name in ("lower", "upper", "work"))
    mount = f'mount -t overlay -o {options} rpack-test "$0" && exec "$@"'
    prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c", mount,
              str(layers["merged"]))
    for _ in range(2):
        done = run_cli(mode, "-v", "run", "--tmpdir", layers["merged"], sh, "-c", "echo ran",
                       prefix=prefix)
        assert (done.returncode, done.stdout) == (0, "ran\n"), done.stderr
        assert "rpack: not using the cache, since the sandbox cannot mount an overlay here: " \
               "cannot mount overlay on " in done.stderr
    base = layers["upper"] / f"rpack-{0 if mode == 'root' else NOBODY}"
    assert list(base.iterdir()) == []
    host.check()


@pytest.mark.heavy
def test_a_build_killed_halfway_is_never_used_and_swept(host: Host, shared: Path) -> None:
    big = shared / "big-build"
    with open(big, "wb") as f:
        f.truncate(600 << 20)
    archive = shared / "big-build.tar.zst"
    created = rpack("create", "--add", big, archive, "/bin/sh")
    big.unlink()
    assert created.returncode == 0, created.stderr
    try:
        process = start_cli("root", "run", "--tmpdir", host.tmpdir, archive, "-c", "echo ran")
        builds = cache_dir(host, "root").glob
        assert wait_for(lambda: any(builds("build-*/root/tmp")), timeout=60)
        process.kill()
        assert process.wait(timeout=30) == -signal.SIGKILL
        (build,) = builds("build-*")
        host.check(roots=2)  # its run's directory, and the half-built root

        done = run_cli("root", "run", "--tmpdir", host.tmpdir, archive, "-c", "echo ran")
        assert (done.returncode, done.stdout, done.stderr) == (0, "ran\n", "")
        assert not build.exists()
        (entry,) = entries(host, "root")
        assert (entry / "root/tmp").is_dir() and (entry / "stamp.json").is_file()
        host.check()
    finally:
        archive.unlink()
