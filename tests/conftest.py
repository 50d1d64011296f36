"""Shared fixtures: build the C samples with gcc and ask the real loader what it maps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard
from elftools.elf.elffile import ELFFile

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
HOST_LOADER = "/lib64/ld-linux-x86-64.so.2"
MUSL_LOADER = "/lib/ld-musl-x86_64.so.1"

# Kernel-provided objects: printed by the trace, never files (loader.md R7).
VDSO_NAMES = frozenset({"linux-vdso.so.1", "linux-gate.so.1", "linux-vdso64.so.1"})

IS_ROOT = os.geteuid() == 0
_ROOT_ONLY = pytest.mark.skipif(not IS_ROOT, reason="needs root: chroot, ldconfig, rpack run")


def needs_root(test: Callable[..., None]) -> Callable[..., None]:
    """Root-only tests carry the `root` mark and skip elsewhere (STYLE.md 4.5)."""
    return pytest.mark.root(_ROOT_ONLY(test))


# --- building samples -------------------------------------------------------------------


def rpath(*dirs: str) -> list[str]:
    """Linker flags for a DT_RPATH (the toolchain defaults to DT_RUNPATH)."""
    return ["-Wl,--disable-new-dtags", "-Wl,-rpath," + ":".join(dirs)]


def runpath(*dirs: str) -> list[str]:
    """Linker flags for a DT_RUNPATH."""
    return ["-Wl,--enable-new-dtags", "-Wl,-rpath," + ":".join(dirs)]


class Toolchain:
    """Builds samples/lib.c and samples/prog.c into given paths with one C compiler.

    `lib(P, *needed)` follows loader.md section 9: `-shared -fPIC`, DT_SONAME = basename of P
    (or `soname=`; None for no DT_SONAME), `--no-as-needed` before the needed objects so that
    every DT_NEEDED stays.
    `defines` become -D flags (a value of None gives a bare -DNAME).
    """

    def __init__(self, cc: str) -> None:
        self.cc = cc

    def lib(
        self,
        path: Path,
        *needed: str | Path,
        soname: str | None = "",
        flags: Sequence[str] = (),
        defines: Mapping[str, str | None] | None = None,
        cwd: Path | None = None,
    ) -> Path:
        name = path.name if soname == "" else soname
        extra = ["-shared", "-fPIC"] + ([f"-Wl,-soname,{name}"] if name else [])
        return self._build(path, "lib.c", needed, extra + list(flags), defines, cwd)

    def exe(
        self,
        path: Path,
        *needed: str | Path,
        flags: Sequence[str] = (),
        defines: Mapping[str, str | None] | None = None,
        cwd: Path | None = None,
    ) -> Path:
        return self._build(path, "prog.c", needed, list(flags), defines, cwd)

    def lib32(self, path: Path, soname: str | None = "") -> Path:
        """A 32-bit i386 library, built without 32-bit libc (loader.md c13)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        obj = path.with_name(path.name + ".o")
        name = path.name if soname == "" else soname
        self._check([self.cc, "-m32", "-fPIC", "-c", "-o", str(obj), str(SAMPLES / "lib.c")])
        self._check(["ld", "-m", "elf_i386", "-shared", "-o", str(path)]
                    + (["-soname", name] if name else []) + [str(obj)])
        obj.unlink()
        return path

    def _build(
        self,
        path: Path,
        source: str,
        needed: Iterable[str | Path],
        flags: list[str],
        defines: Mapping[str, str | None] | None,
        cwd: Path | None,
    ) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        dflags = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in (defines or {}).items()]
        cmd = [self.cc, "-o", str(path), str(SAMPLES / source), *dflags, *flags]
        # Debian's gcc passes --as-needed, which would drop DT_NEEDED entries nothing uses.
        cmd += ["-Wl,--no-as-needed", *map(str, needed)]
        self._check(cmd, cwd)
        return path

    @staticmethod
    def _check(cmd: list[str], cwd: Path | None = None) -> None:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"build failed: {' '.join(cmd)}\n{proc.stderr}")


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def retag_dynamic(path: Path, old: int, new: int) -> None:
    """Rewrite the first .dynamic entry with d_tag `old` to `new` (loader.md 9.1, c03)."""
    with open(path, "rb") as f:
        section = ELFFile(f).get_section_by_name(".dynamic")
        start, size = section["sh_offset"], section["sh_size"]
        f.seek(start)
        table = f.read(size)
    for off in range(0, size, 16):
        if int.from_bytes(table[off:off + 8], "little", signed=True) == old:
            patch_bytes(path, start + off, new.to_bytes(8, "little", signed=True))
            return
    raise AssertionError(f"{path}: no dynamic tag {old}")


def dynamic_tags(path: Path) -> dict[str, list[object]]:
    """The .dynamic entries of an ELF file: tag name -> values (for checking a build)."""
    tags: dict[str, list[object]] = {}
    with open(path, "rb") as f:
        for tag in ELFFile(f).get_section_by_name(".dynamic").iter_tags():
            for attr in ("needed", "rpath", "runpath", "soname"):
                if hasattr(tag, attr):
                    tags.setdefault(tag.entry.d_tag, []).append(getattr(tag, attr))
                    break
            else:
                tags.setdefault(tag.entry.d_tag, []).append(tag.entry.d_val)
    return tags


def copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)
    return dest


@pytest.fixture(scope="session")
def gcc() -> Toolchain:
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler (gcc) on this machine")
    return Toolchain("gcc")


@pytest.fixture(scope="session")
def musl_gcc() -> Toolchain:
    if shutil.which("musl-gcc") is None or not os.path.exists(MUSL_LOADER):
        pytest.skip("musl-gcc is not installed (Debian: apt-get install musl-tools)")
    return Toolchain("musl-gcc")


# --- the real loader ----------------------------------------------------------------------


@dataclass
class Trace:
    """What LD_TRACE_LOADED_OBJECTS printed, and how the process ended."""

    rc: int
    stdout: str
    stderr: str
    found: dict[str, str] = field(default_factory=dict)  # requested name -> opened path
    bare: list[str] = field(default_factory=list)  # slash names and the interpreter
    missing: list[str] = field(default_factory=list)

    def opened(self, name: str) -> str | None:
        """The path `name` was opened by (the trace prints a bare line when they are equal)."""
        return self.found.get(name, name if name in self.bare else None)

    @property
    def paths(self) -> set[str]:
        """Every object the loader mapped, as the string it opened it by."""
        return set(self.found.values()) | set(self.bare)


_FOUND = re.compile(r"^\t(.+) => (.+) \(0x[0-9a-f]+\)$")
_MISSING = re.compile(r"^\t(.+) => not found$")
_BARE = re.compile(r"^\t(.+) \(0x[0-9a-f]+\)$")


def parse_trace(proc: subprocess.CompletedProcess[str]) -> Trace:
    trace = Trace(proc.returncode, proc.stdout, proc.stderr)
    for line in proc.stdout.splitlines():
        if m := _FOUND.match(line):
            trace.found[m[1]] = m[2]
        elif m := _MISSING.match(line):
            trace.missing.append(m[1])
        elif (m := _BARE.match(line)) and m[1] not in VDSO_NAMES:
            trace.bare.append(m[1])
    return trace


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A small environment without any LD_* variable of the test runner's own."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LC_ALL": "C"}
    env.update(extra or {})
    return env


def _chroot_into(root: Path) -> None:
    os.chroot(root)
    os.chdir("/")


def run(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    chroot: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Execute a program directly (no shell: a shell would eat LD_TRACE_LOADED_OBJECTS)."""
    return subprocess.run(
        [str(a) for a in argv],
        env=clean_env(env),
        cwd=None if chroot else cwd,
        preexec_fn=(lambda: _chroot_into(chroot)) if chroot else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def loader_trace(
    program: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    chroot: Path | None = None,
) -> Trace:
    """The glibc oracle: `LD_TRACE_LOADED_OBJECTS=1 program`, executed directly."""
    env = {**(env or {}), "LD_TRACE_LOADED_OBJECTS": "1"}
    return parse_trace(run([program], env=env, cwd=cwd, chroot=chroot))


_MUSL_MISSING = re.compile(r"^Error loading shared library (.+): No such file or directory")


def musl_trace(program: Path, *, env: Mapping[str, str] | None = None) -> Trace:
    """The musl oracle: musl ignores LD_TRACE_LOADED_OBJECTS; `ld-musl --list` traces.

    Give an absolute program path: musl takes the program's $ORIGIN from the path on the
    command line when started through the loader.  musl stops at the first missing library
    and names it on stderr.
    """
    trace = parse_trace(run([MUSL_LOADER, "--list", program], env=env))
    for line in trace.stderr.splitlines():
        if m := _MUSL_MISSING.match(line):
            trace.missing.append(m[1])
    return trace


def printed_objects(stdout: str) -> set[str]:
    """The `object: NAME` lines of `prog --objects`: the mapped files (no vDSO).

    glibc names the vDSO linux-vdso.so.1, musl leaves its name empty.
    """
    names = {line[len("object:"):].strip() for line in stdout.splitlines()
             if line.startswith("object:")}
    return names - VDSO_NAMES - {""}


def _diagnostics() -> dict[str, str]:
    out = subprocess.run([HOST_LOADER, "--list-diagnostics"], capture_output=True, text=True)
    values = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key] = value.strip('"')
    return values


@dataclass(frozen=True)
class HostLoader:
    """The host's loader parameters (loader.md R60)."""

    dst_lib: str  # $LIB
    platform: str  # $PLATFORM
    hwcaps_active: tuple[str, ...]  # active glibc-hwcaps subdirectories, best first
    legacy_hwcaps: bool  # glibc < 2.37 probes tls/ and the platform subdirectories


@pytest.fixture(scope="session")
def host_loader() -> HostLoader:
    diag = _diagnostics()
    names = diag["dl_hwcaps_subdirs"].split(":")
    mask = int(diag["dl_hwcaps_subdirs_active"], 0)
    helptext = subprocess.run([HOST_LOADER, "--help"], capture_output=True, text=True).stdout
    return HostLoader(
        dst_lib=diag["dl_dst_lib"],
        platform=diag["dl_platform"],
        hwcaps_active=tuple(n for i, n in enumerate(names) if mask >> i & 1),
        legacy_hwcaps="tls (supported, searched)" in helptext,
    )


# --- rpack --------------------------------------------------------------------------------


RPACK = [sys.executable, "-m", "rpack"]


def rpack_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the tests run rpack in: clean, with this checkout importable."""
    return clean_env({"PYTHONPATH": str(REPO), **(extra or {})})


def rpack(
    *args: str | Path, cwd: Path | None = None, timeout: float = 300,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the rpack CLI as `python -m rpack`, in a clean environment."""
    return subprocess.run(
        [*RPACK, *map(str, args)],
        cwd=cwd,
        env=rpack_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


NOBODY = 65534

# rpack's CLI as nobody. Everything is imported and the arguments parsed before the switch:
# the interpreter and this checkout may live where nobody can read (a pyenv under /root).
AS_NOBODY = f"""
import os, sys
import packer.errors, rpack.cli, runner.launch, unpacker, tqdm, tqdm.utils
rpack.cli.build_parser().parse_args(sys.argv[1:])
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
sys.exit(rpack.cli.main(sys.argv[1:]))
"""


def cli(mode: str, *args: str | Path) -> list[str]:
    """The command line of `rpack ARGS`, run as root or as nobody."""
    prefix = RPACK if mode == "root" else [sys.executable, "-c", AS_NOBODY]
    return [*prefix, *map(str, args)]


def run_cli(mode: str, *args: str | Path, prefix: tuple[str, ...] = (),
            env: dict[str, str] | None = None, timeout: float = 120,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """`rpack ARGS` as root or as nobody, from a directory both can enter."""
    return subprocess.run([*prefix, *cli(mode, *args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=rpack_env(env),
                          cwd=cwd or tempfile.gettempdir(), timeout=timeout)


def env_args(env: Mapping[str, str] | None) -> list[str]:
    return [arg for key, value in (env or {}).items() for arg in ("--env", f"{key}={value}")]


def rpack_deps(
    *programs: str | Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    allow_missing: bool = False,
) -> tuple[subprocess.CompletedProcess[str], dict | None]:
    """`rpack deps --json`; the parsed JSON when it exited 0."""
    flags = ["--allow-missing"] if allow_missing else []
    proc = rpack("deps", "--json", *env_args(env), *flags, *programs, cwd=cwd)
    return proc, json.loads(proc.stdout) if proc.returncode == 0 else None


def loaded_paths(deps: dict) -> set[str]:
    """The library and interpreter paths of a `deps --json` answer (the loader's l_names)."""
    return {f["path"] for f in deps["files"] if f["kind"] in ("library", "interpreter")}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("rpack: error: ")]


# --- archives -----------------------------------------------------------------------------


def _members(archive: Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    with open(archive, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as stream:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                yield tar, member


def _name(member: tarfile.TarInfo) -> str:
    return member.name.removeprefix("./").rstrip("/")


def archive_members(archive: Path) -> dict[str, tarfile.TarInfo]:
    """The members of an rpack archive by path inside the root (no leading slash)."""
    return {_name(member): member for _, member in _members(archive)}


def archive_read(archive: Path, name: str) -> bytes:
    for tar, member in _members(archive):
        if _name(member) == name and member.isfile():
            data = tar.extractfile(member)
            assert data is not None
            return data.read()
    raise AssertionError(f"{archive}: no regular file {name!r}")


def resolve_member(members: Mapping[str, tarfile.TarInfo], path: str) -> str | None:
    """The member a path leads to inside the archive's root, following its symlinks."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    for _ in range(200):
        if not todo:
            return "/".join(done)
        part = todo.pop(0)
        if part == "..":
            done = done[:-1]
            continue
        member = members.get("/".join([*done, part]))
        if member is None:
            return None
        if member.issym():
            done = [] if member.linkname.startswith("/") else done
            todo = [p for p in member.linkname.split("/") if p not in ("", ".")] + todo
        else:
            done.append(part)
    return None  # a symlink loop
