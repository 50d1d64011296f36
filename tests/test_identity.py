"""rpack run's /etc: generated passwd and group, the host's resolv.conf and hosts, git, locale."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import NOBODY, run_cli
from test_run import (
    MODES,
    Host,
    Member,
    create,
    hardlink,
    host,
    read_members,
    regular,
    repack,
    shared,
    symlink,
)

pytestmark = pytest.mark.root

__all__ = ["host", "shared"]  # fixtures, shared with test_run

PASSWD = {"root": "root:x:0:0:root:/:/bin/sh\n",
          "nobody": "root:x:0:0:root (nobody on the host):/:/bin/sh\n"}


@pytest.fixture(scope="module")
def ids(shared: Path) -> Path:
    # create packs an nsswitch.conf and its modules; `files` is built into glibc 2.34+.
    return create(shared, "ids.tar.zst", "/usr/bin/id", "/usr/bin/whoami", "/usr/bin/getent",
                  "/bin/sh", "/bin/cat", "/bin/ls", "/usr/bin/readlink")


@pytest.fixture(scope="module")
def git(shared: Path) -> Path:
    # git init copies its templates; without them it warns.
    return create(shared, "git.tar.zst", "/usr/bin/git", "/bin/sh",
                  "--add", "/usr/share/git-core/templates")


@pytest.fixture(scope="module")
def locale(shared: Path) -> Path:
    # create packs the C.UTF-8 locale with glibc.
    return create(shared, "locale.tar.zst", "/usr/bin/locale", "/bin/sh")


def without_etc(archive: Path, out: Path, *add: Member) -> Path:
    """A copy of archive without its etc tree, plus the members in add."""
    names = [info.name for info, _ in read_members(archive)[1:]]
    drop = tuple(name for name in names if name == "etc" or name.startswith("etc/"))
    return repack(archive, out, drop=drop, add=add)


def shown(mode: str, host: Host, archive: Path, script: str, *options: str) -> str:
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, *options, "--entrypoint", "/bin/sh",
                   archive, "-c", script)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return done.stdout


@pytest.mark.parametrize("mode", MODES)
def test_id_whoami_getent_in_the_root(host: Host, ids: Path, mode: str) -> None:
    out = shown(mode, host, ids, "id; whoami; getent passwd root; getent passwd nobody; "
                "getent group root; getent hosts localhost")
    lines = out.splitlines()
    assert lines[:5] == ["uid=0(root) gid=0(root) groups=0(root)", "root",
                         PASSWD[mode].strip(),
                         "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
                         "root:x:0:"]
    assert len(lines) == 6 and lines[5].split()[1:] == ["localhost"]
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_host_files_are_bound_read_only(host: Host, ids: Path, mode: str) -> None:
    out = shown(mode, host, ids, "cat /etc/resolv.conf /etc/hosts; "
                "{ echo x >> /etc/hosts; } 2>/dev/null || echo read-only; "
                "{ echo x >> /etc/resolv.conf; } 2>/dev/null || echo read-only")
    host_text = Path("/etc/resolv.conf").read_text() + Path("/etc/hosts").read_text()
    assert out == host_text + "read-only\nread-only\n"
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_no_host_files_leaves_the_archives_own(host: Host, ids: Path, shared: Path,
                                              mode: str) -> None:
    # An image's resolv.conf that links to a resolver's file gives way to the host's.
    archive = repack(ids, shared / f"resolv-link-{mode}.tar.zst",
                     add=(regular("etc/hosts", b"10.1.2.3 packed\n"),
                          symlink("etc/resolv.conf", "../run/resolv.conf")))
    script = "cat /etc/hosts; readlink /etc/resolv.conf || cat /etc/resolv.conf"
    assert shown(mode, host, archive, script, "--no-host-files") == (
        "10.1.2.3 packed\n../run/resolv.conf\n")
    assert shown(mode, host, archive, script) == (
        Path("/etc/hosts").read_text() + Path("/etc/resolv.conf").read_text())
    bare = without_etc(ids, shared / f"no-etc-{mode}.tar.zst")
    assert shown(mode, host, bare, "ls /etc", "--no-host-files") == "group\npasswd\n"
    host.check()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("passwd", "whoami", "kept"), [
    (b"toor:x:0:0:packed root:/root:/bin/sh\n", "toor", True),
    (b"daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin", "root", False),
], ids=["has-root", "no-root"])
def test_archives_own_passwd_is_kept(host: Host, ids: Path, shared: Path, mode: str,
                                     passwd: bytes, whoami: str, kept: bool) -> None:
    archive = repack(ids, shared / f"passwd-{mode}-{whoami}.tar.zst",
                     add=(regular("etc/passwd", passwd),))
    out = shown(mode, host, archive, "whoami; cat /etc/passwd")
    added = "" if kept else "\n" + PASSWD[mode]
    assert out == f"{whoami}\n{passwd.decode()}{added}"
    host.check()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_etc_that_is_a_symlink_is_left_alone(host: Host, ids: Path, shared: Path, mode: str,
                                             kind: str) -> None:
    # Nothing may be written through the archive's links, not even into the root itself.
    decoy = host.outside / "decoy"
    decoy.mkdir()
    decoy.chmod(0o777)
    target = str(decoy) if kind == "absolute" else "usr"
    archive = without_etc(ids, shared / f"etc-link-{mode}-{kind}.tar.zst",
                          symlink("etc", target))
    host.state = host.snapshot()
    done = run_cli(mode, "run", "--keep", "--tmpdir", host.tmpdir, "--entrypoint", "/bin/sh",
                   archive, "-c", "id -u; whoami 2>/dev/null || echo no name")
    assert (done.returncode, done.stdout) == (0, "0\nno name\n")
    (root,) = host.roots()
    assert done.stderr.splitlines() == [
        f"rpack: warning: /etc in the root is a symlink to {target}: no /etc/passwd, /etc/group, "
        "/etc/resolv.conf or /etc/hosts were set up",
        f"rpack: the root stays at {root}",
    ]
    assert not {"passwd", "group", "hosts", "resolv.conf"} & set(os.listdir(root / "usr"))
    shutil.rmtree(root)
    assert list(decoy.iterdir()) == []
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_git_in_a_bound_directory(host: Host, git: Path, mode: str) -> None:
    work = host.tmpdir / "work"
    work.mkdir()
    owner = 0 if mode == "root" else NOBODY
    os.chown(work, owner, owner)
    identity = [f"--env=GIT_{who}_{what}={value}" for who in ("AUTHOR", "COMMITTER")
                for what, value in (("NAME", "Ann Example"), ("EMAIL", "ann@example.org"))]
    script = ("echo $HOME; git init -q -b main . && echo hello > hello.txt && git add hello.txt "
              "&& git commit -q -m first && git log --format='%an <%ae> %s'")
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, "--bind", f"{work}:/work",
                   "--workdir", "/work", *identity, "--entrypoint", "/bin/sh", git, "-c", script)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout == "/\nAnn Example <ann@example.org> first\n"
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in [work, *work.rglob("*")]}
    assert owners == {(owner, owner)}
    assert (work / ".git/HEAD").read_text() == "ref: refs/heads/main\n"
    shutil.rmtree(work)
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_locale_is_the_archives_not_the_hosts(host: Host, locale: Path, mode: str) -> None:
    archive = locale
    # The host's LANG stays outside: it would name a locale the root may not have.
    outside = {"TMPDIR": str(host.tmpdir), "LANG": "de_DE.UTF-8", "LC_ALL": "de_DE.UTF-8"}
    done = run_cli(mode, "run", "--entrypoint", "/usr/bin/locale", archive, "charmap",
                   env=outside)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ANSI_X3.4-1968\n", "")
    done = run_cli(mode, "run", "--env", "LANG=C.UTF-8", "--entrypoint", "/usr/bin/locale",
                   archive, "charmap", env=outside)
    assert (done.returncode, done.stdout, done.stderr) == (0, "UTF-8\n", "")
    host.check()


@pytest.mark.parametrize("cache", ["--no-cache", "--cache-size=1G"])
def test_passwd_that_is_a_hard_link_is_left_alone(host: Host, ids: Path, shared: Path,
                                                  cache: str) -> None:
    # Appending root's line would change the other name as well.
    other = b"user:x:1000:1000::/:/bin/sh\n"
    archive = repack(ids, shared / f"passwd-hardlink{cache}.tar.zst",
                     add=(regular("etc/opasswd", other), hardlink("etc/passwd", "etc/opasswd")))
    done = run_cli("root", "run", "--tmpdir", host.tmpdir, cache, "--entrypoint", "/bin/sh",
                   archive, "-c", "cat /etc/opasswd /etc/passwd")
    assert (done.returncode, done.stdout) == (0, other.decode() * 2)
    assert done.stderr == ("rpack: warning: /etc/passwd in the root is a hard link: it was "
                           "left as it is\n")
    host.check()


@pytest.mark.parametrize("mode", MODES)
def test_passwd_that_is_a_symlink_is_left_alone(host: Host, ids: Path, shared: Path,
                                                mode: str) -> None:
    decoy = host.outside / "passwd"
    decoy.write_text("decoy:x:5:5::/:/bin/sh\n")
    decoy.chmod(0o666)
    archive = repack(ids, shared / f"passwd-link-{mode}.tar.zst",
                     add=(symlink("etc/passwd", str(decoy)),))
    host.state = host.snapshot()
    done = run_cli(mode, "run", "--tmpdir", host.tmpdir, "--entrypoint", "/bin/sh", archive,
                   "-c", "getent group root; cat /etc/passwd 2>/dev/null || echo dangling")
    # The link leads nowhere inside the root, and the host's decoy is untouched.
    assert (done.returncode, done.stdout) == (0, "root:x:0:\ndangling\n")
    assert done.stderr == ("rpack: warning: /etc/passwd in the root is a symlink: it was left "
                           "as it is\n")
    host.check()
