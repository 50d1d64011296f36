"""The loader test matrix (spec/loader.md section 9): the real loader is the oracle for rpack.

Each case builds a small layout from samples/ in its own directory, then
  1. test_oracle: the real loader (glibc: LD_TRACE_LOADED_OBJECTS=1, the program executed
     directly; musl: `ld-musl --list`) and a real run behave as loader.md says, so a case
     built wrong fails loudly;
  2. test_deps: `rpack deps --json` maps the same objects, by the same strings, or fails as
     the loader does (a missing library, a fatal candidate);
  3. test_packed: where the loader succeeds, the program packed by `rpack create` runs under
     `rpack run` and maps the same objects inside the packed root (root only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import (
    HOST_LOADER,
    IS_ROOT,
    MUSL_LOADER,
    HostLoader,
    Toolchain,
    Trace,
    archive_members,
    archive_read,
    copy,
    dynamic_tags,
    env_args,
    error_lines,
    loaded_paths,
    loader_trace,
    musl_trace,
    needs_root,
    parse_trace,
    patch_bytes,
    printed_objects,
    resolve_member,
    retag_dynamic,
    rpack,
    rpack_deps,
    rpath,
    run,
    runpath,
)

DEFAULT_DIR = "/lib/x86_64-linux-gnu"
LIBC = f"{DEFAULT_DIR}/libc.so.6"
LIBZ = f"{DEFAULT_DIR}/libz.so.1"


@dataclass
class Case:
    """One layout and what the real loader does with it (loader.md section 9)."""

    program: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    found: dict[str, str] = field(default_factory=dict)  # name -> path it must be opened by
    bare: list[str] = field(default_factory=list)  # slash names loaded as written
    missing: dict[str, str] = field(default_factory=dict)  # name -> basename of who needs it
    absent: list[str] = field(default_factory=list)  # names that must not be mapped at all
    fatal: str = ""  # stderr of a fatal candidate, e.g. "T/txt/liba.so.1: invalid ELF header"
    bad_file: str = ""  # the fatal candidate rpack must name
    run_stderr: str = ""  # expected in the real run's stderr
    output: str = ""  # expected in the program's stdout besides "sample ok"
    musl: bool = False  # set from the registry

    @property
    def loads(self) -> bool:
        """Whether the real program starts (a missing LD_PRELOAD is only a warning)."""
        return not self.fatal and not self.missing


Builder = Callable[[Path, Toolchain, HostLoader], Case]


@dataclass(frozen=True)
class Entry:
    build: Builder
    fails: bool  # the program cannot start: no packed run
    musl: bool  # built with musl-gcc


CASES: dict[str, Entry] = {}


def case(case_id: str, *, fails: bool = False, musl: bool = False) -> Callable[[Builder], Builder]:
    def register(build: Builder) -> Builder:
        CASES[case_id] = Entry(build, fails, musl)
        return build

    return register


# --- loader.md section 9 ------------------------------------------------------------------


def _origin_app(t: Path, cc: Toolchain, flags: list[str]) -> Case:
    cc.lib(t / "app/lib/liba.so.1")
    prog = cc.exe(t / "app/bin/prog", t / "app/lib/liba.so.1", flags=flags)
    return Case(prog, found={"liba.so.1": f"{t}/app/bin/../lib/liba.so.1"})


@case("c01")
def c01(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    app = _origin_app(t, cc, runpath("$ORIGIN/../lib"))
    assert dynamic_tags(app.program)["DT_RUNPATH"] == ["$ORIGIN/../lib"]
    return app


@case("c02")
def c02(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    app = _origin_app(t, cc, rpath("$ORIGIN/../lib"))
    assert dynamic_tags(app.program)["DT_RPATH"] == ["$ORIGIN/../lib"]
    return app


@case("c03")
def c03(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    for sub in ("rp", "ru"):
        cc.lib(t / sub / "liba.so.1")
    # An executable's DT_SONAME string, retagged, is the only way to get both tags.
    flags = rpath("$ORIGIN/rp") + ["-Wl,-soname,$ORIGIN/ru"]
    prog = cc.exe(t / "prog", t / "ru/liba.so.1", flags=flags)
    retag_dynamic(prog, 14, 29)
    tags = dynamic_tags(prog)
    assert tags["DT_RPATH"] == ["$ORIGIN/rp"] and tags["DT_RUNPATH"] == ["$ORIGIN/ru"]
    return Case(prog, found={"liba.so.1": f"{t}/ru/liba.so.1"})


def _inherit(t: Path, cc: Toolchain, exe_flags: list[str], liba_flags: list[str] = ()) -> Path:
    cc.lib(t / "x/libb.so.1")
    cc.lib(t / "a/liba.so.1", t / "x/libb.so.1", flags=liba_flags)
    return cc.exe(t / "prog", t / "a/liba.so.1", flags=exe_flags)


@case("c04")
def c04(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = _inherit(t, cc, rpath("$ORIGIN/a:$ORIGIN/x"))
    return Case(prog, found={"liba.so.1": f"{t}/a/liba.so.1", "libb.so.1": f"{t}/x/libb.so.1"})


@case("c05", fails=True)
def c05(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = _inherit(t, cc, runpath("$ORIGIN/a:$ORIGIN/x"))
    return Case(prog, found={"liba.so.1": f"{t}/a/liba.so.1"}, missing={"libb.so.1": "liba.so.1"})


@case("c06", fails=True)
def c06(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    (t / "a/empty").mkdir(parents=True)
    prog = _inherit(t, cc, rpath("$ORIGIN/a:$ORIGIN/x"), runpath("$ORIGIN/empty"))
    return Case(prog, found={"liba.so.1": f"{t}/a/liba.so.1"}, missing={"libb.so.1": "liba.so.1"})


def _two_dirs(t: Path, cc: Toolchain, first: str, flags: list[str]) -> Path:
    for sub in (first, "llp"):
        cc.lib(t / sub / "liba.so.1")
    return cc.exe(t / "prog", t / first / "liba.so.1", flags=flags)


@case("c09")
def c09(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = _two_dirs(t, cc, "ru", runpath("$ORIGIN/ru"))
    env = {"LD_LIBRARY_PATH": f"{t}/llp"}
    return Case(prog, env=env, found={"liba.so.1": f"{t}/llp/liba.so.1"})


@case("c10")
def c10(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = _two_dirs(t, cc, "rp", rpath("$ORIGIN/rp"))
    env = {"LD_LIBRARY_PATH": f"{t}/llp"}
    return Case(prog, env=env, found={"liba.so.1": f"{t}/rp/liba.so.1"})


@case("c11")
def c11(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    cc.lib(t / "work/liba.so.1")
    prog = cc.exe(t / "prog", t / "work/liba.so.1")
    env = {"LD_LIBRARY_PATH": ":/nonexistent"}
    return Case(prog, env=env, cwd=t / "work", found={"liba.so.1": "liba.so.1"})


@case("c12")
def c12(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    cc.lib(t / "work/lib/liba.so.1")
    prog = cc.exe(t / "prog", t / "work/lib/liba.so.1", flags=runpath("lib"))
    return Case(prog, cwd=t / "work", found={"liba.so.1": "lib/liba.so.1"})


def _decoy_first(t: Path, cc: Toolchain, decoy: str) -> Path:
    """liba.so.1 in `decoy`/ (filled in by the caller), the real one in d64/ after it."""
    (t / decoy).mkdir(parents=True, exist_ok=True)
    cc.lib(t / "d64/liba.so.1")
    return cc.exe(t / "prog", t / "d64/liba.so.1", flags=runpath(f"$ORIGIN/{decoy}:$ORIGIN/d64"))


@case("c13")
def c13(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    cc.lib32(t / "d32/liba.so.1")
    prog = _decoy_first(t, cc, "d32")
    return Case(prog, found={"liba.so.1": f"{t}/d64/liba.so.1"})


@case("c14")
def c14(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = _decoy_first(t, cc, "arm")
    patch_bytes(copy(t / "d64/liba.so.1", t / "arm/liba.so.1"), 18, (183).to_bytes(2, "little"))
    return Case(prog, found={"liba.so.1": f"{t}/d64/liba.so.1"})


def _fatal(t: Path, prog: Path, message: str) -> Case:
    bad = f"{t}/bad/liba.so.1"
    return Case(prog, fatal=f"{bad}: {message}", bad_file=bad)


@case("c15", fails=True)
def c15(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = _decoy_first(t, cc, "txt")
    (t / "txt/liba.so.1").write_text("/* GNU ld script: not an ELF file at all */\n" * 3)
    bad = f"{t}/txt/liba.so.1"
    return Case(prog, fatal=f"{bad}: invalid ELF header", bad_file=bad)


def _patched_decoy(t: Path, cc: Toolchain, offset: int, value: int, message: str) -> Case:
    prog = _decoy_first(t, cc, "bad")
    patch_bytes(copy(t / "d64/liba.so.1", t / "bad/liba.so.1"), offset, bytes([value]))
    return _fatal(t, prog, message)


@case("c16", fails=True)
def c16(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    return _patched_decoy(t, cc, 5, 2, "ELF file data encoding not little-endian")


@case("c17", fails=True)
def c17(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    return _patched_decoy(t, cc, 7, 9, "ELF file OS ABI invalid")


@case("c18", fails=True)
def c18(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = _decoy_first(t, cc, "bad")
    (t / "bad/liba.so.1").touch()
    return _fatal(t, prog, "file too short")


@case("c20")
def c20(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    lib = cc.lib(t / "abs/libabs.so", soname=None)
    prog = cc.exe(t / "prog", lib)
    assert dynamic_tags(prog)["DT_NEEDED"][0] == str(lib)
    return Case(prog, bare=[str(lib)])


def _relative_slash(t: Path, cc: Toolchain) -> Path:
    cc.lib(t / "work/sub/librel.so", soname=None)
    prog = cc.exe(t / "prog", "sub/librel.so", cwd=t / "work")
    assert dynamic_tags(prog)["DT_NEEDED"][0] == "sub/librel.so"
    return prog


@case("c21")
def c21(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    return Case(_relative_slash(t, cc), cwd=t / "work", bare=["sub/librel.so"])


@case("c21b", fails=True)
def c21b(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    return Case(_relative_slash(t, cc), cwd=t, missing={"sub/librel.so": "prog"})


@case("c22")
def c22(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    lib = cc.lib(t / "app/lib/liborig.so", soname="$ORIGIN/../lib/liborig.so",
                 defines={"FN": "orig_fn"})
    prog = cc.exe(t / "app/bin/prog", lib, defines={"CALL": "orig_fn"})
    return Case(prog, bare=[f"{t}/app/bin/../lib/liborig.so"], output="call: orig_fn")


@case("c23", fails=True)
def c23(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    lib = cc.lib(t / "lib/libgone.so.1")
    prog = cc.exe(t / "prog", lib, flags=runpath("$ORIGIN/lib"))
    lib.unlink()
    return Case(prog, missing={"libgone.so.1": "prog"})


def _chain(t: Path, cc: Toolchain, stem: str, depth: int) -> Path:
    """lib{stem}1 -> lib{stem}2 -> ... -> lib{stem}{depth}, all in app/lib."""
    below: list[Path] = []
    for n in range(depth, 0, -1):
        below = [cc.lib(t / f"app/lib/lib{stem}{n}.so.1", *below, defines={"FN": f"{stem}{n}"})]
    return below[0]


@case("c25")
def c25(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = cc.exe(t / "app/bin/prog", _chain(t, cc, "d", 8), flags=rpath("$ORIGIN/../lib"))
    found = {f"libd{n}.so.1": f"{t}/app/bin/../lib/libd{n}.so.1" for n in range(1, 9)}
    return Case(prog, found=found)


@case("c25b", fails=True)
def c25b(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = cc.exe(t / "app/bin/prog", _chain(t, cc, "e", 3), flags=runpath("$ORIGIN/../lib"))
    found = {"libe1.so.1": f"{t}/app/bin/../lib/libe1.so.1"}
    return Case(prog, found=found, missing={"libe2.so.1": "libe1.so.1"})


def _soname_not_filename(t: Path, cc: Toolchain) -> Path:
    bar = cc.lib(t / "real/libbar-1.2.so", soname="libbar.so.1")
    cc.lib(t / "lib/liba.so.1", bar)
    return cc.exe(t / "prog", t / "lib/liba.so.1", flags=runpath("$ORIGIN/lib"))


@case("c27")
def c27(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = _soname_not_filename(t, cc)
    bar = f"{t}/real/libbar-1.2.so"
    return Case(prog, env={"LD_PRELOAD": bar}, found={"liba.so.1": f"{t}/lib/liba.so.1"},
                bare=[bar])


@case("c27-nopreload", fails=True)
def c27_nopreload(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = _soname_not_filename(t, cc)
    return Case(prog, found={"liba.so.1": f"{t}/lib/liba.so.1"},
                missing={"libbar.so.1": "liba.so.1"})


def _best(host: HostLoader, base: str, levels: list[str]) -> str:
    """The directory the loader probes first among base/ and base/glibc-hwcaps/LEVEL/."""
    for level in host.hwcaps_active:
        if level in levels:
            return f"{base}/glibc-hwcaps/{level}"
    return base


@case("c29")
def c29(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    levels = ["x86-64-v2", "x86-64-v3"]
    for sub in ["", *(f"glibc-hwcaps/{level}/" for level in levels)]:
        cc.lib(t / f"L/{sub}liba.so.1")
    prog = cc.exe(t / "prog", t / "L/liba.so.1")
    found = {"liba.so.1": _best(host, f"{t}/L", levels) + "/liba.so.1"}
    return Case(prog, env={"LD_LIBRARY_PATH": f"{t}/L"}, found=found)


def _legacy(t: Path, cc: Toolchain, host: HostLoader, levels: list[str]) -> Case:
    for sub in ["", "tls/", "x86_64/", *(f"glibc-hwcaps/{level}/" for level in levels)]:
        cc.lib(t / f"L/{sub}liba.so.1")
    prog = cc.exe(t / "prog", t / "L/liba.so.1", flags=runpath(f"{t}/L"))
    best = _best(host, f"{t}/L", levels)
    if best == f"{t}/L" and host.legacy_hwcaps:
        best += "/tls"  # glibc < 2.37 probes tls/ before the platform subdirectory
    return Case(prog, found={"liba.so.1": f"{best}/liba.so.1"})


@case("c30")
def c30(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    return _legacy(t, cc, host, [])


@case("c30-hwcaps")
def c30_hwcaps(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    return _legacy(t, cc, host, ["x86-64-v2"])


@case("c32")
def c32(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    a = cc.lib(t / host.dst_lib / "liba.so.1")
    b = cc.lib(t / "plat" / host.platform / "libb.so.1")
    prog = cc.exe(t / "prog", a, b, flags=runpath("$ORIGIN/$LIB:$ORIGIN/plat/${PLATFORM}"))
    return Case(prog, found={"liba.so.1": str(a), "libb.so.1": str(b)})


@case("c33")
def c33(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    a = cc.lib(t / "x/liba.so.1")
    b = cc.lib(t / "$FOO/libb.so.1")
    prog = cc.exe(t / "prog", a, b, flags=runpath("${ORIGIN}/x:$ORIGIN/$FOO"))
    return Case(prog, found={"liba.so.1": str(a), "libb.so.1": str(b)})


@case("c36")
def c36(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    lib = cc.lib(t / "lib/liba.so.1", HOST_LOADER)
    assert "ld-linux-x86-64.so.2" in dynamic_tags(lib)["DT_NEEDED"]
    prog = cc.exe(t / "prog", lib, flags=runpath("$ORIGIN/lib"))
    # Satisfied by the running loader through its SONAME: no search, no line of its own.
    return Case(prog, found={"liba.so.1": str(lib)}, absent=["ld-linux-x86-64.so.2"])


@case("c37")
def c37(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    pre = cc.lib(t / "rp/libpre.so.1")
    prog = cc.exe(t / "prog", flags=rpath("$ORIGIN/rp"))
    return Case(prog, env={"LD_PRELOAD": "libpre.so.1"}, found={"libpre.so.1": str(pre)})


@case("c38")
def c38(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = cc.exe(t / "prog")
    return Case(prog, env={"LD_PRELOAD": "libdoesnotexist.so"}, absent=["libdoesnotexist.so"],
                run_stderr="cannot be preloaded")


@case("c40")
def c40(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = cc.exe(t / "prog", defines={"PLUGIN": '"libz.so.1"'})
    assert b"libz.so.1\0" in prog.read_bytes()  # what `strings` shows (R77)
    return Case(prog, absent=["libz.so.1"])


# --- more cases, one rule each ------------------------------------------------------------


@case("R10-breadth-first")
def r10_breadth_first(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    # Breadth-first, libb's libfoo (from B/) is mapped before libmid's (X/) is looked up.
    cc.lib(t / "B/libfoo.so.1")
    cc.lib(t / "X/libfoo.so.1")
    cc.lib(t / "lib/libmid.so.1", t / "X/libfoo.so.1", flags=runpath("$ORIGIN/../X"))
    cc.lib(t / "lib/liba.so.1", t / "lib/libmid.so.1", flags=runpath("$ORIGIN"))
    cc.lib(t / "lib/libb.so.1", t / "B/libfoo.so.1", flags=runpath("$ORIGIN/../B"))
    prog = cc.exe(t / "prog", t / "lib/liba.so.1", t / "lib/libb.so.1",
                  flags=runpath("$ORIGIN/lib"))
    found = {n: f"{t}/lib/{n}" for n in ("liba.so.1", "libb.so.1", "libmid.so.1")}
    return Case(prog, found={**found, "libfoo.so.1": f"{t}/lib/../B/libfoo.so.1"})


@case("R11-soname-reuse")
def r11_soname_reuse(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    # libb's own RUNPATH would find two/libs.so.1; the one liba loaded first is reused.
    for sub in ("one", "two"):
        cc.lib(t / sub / "libs.so.1")
    cc.lib(t / "lib/liba.so.1", t / "one/libs.so.1", flags=runpath("$ORIGIN/../one"))
    cc.lib(t / "lib/libb.so.1", t / "two/libs.so.1", flags=runpath("$ORIGIN/../two"))
    prog = cc.exe(t / "prog", t / "lib/liba.so.1", t / "lib/libb.so.1",
                  flags=runpath("$ORIGIN/lib"))
    found = {n: f"{t}/lib/{n}" for n in ("liba.so.1", "libb.so.1")}
    return Case(prog, found={**found, "libs.so.1": f"{t}/lib/../one/libs.so.1"})


@case("R11-soname-of-slash-name")
def r11_soname_of_slash_name(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    # The program loads real/libbar-1.2.so by a $ORIGIN path; its SONAME libbar.so.1 then
    # satisfies liba's DT_NEEDED, which no search path could find.
    stub = cc.lib(t / "stub/libbar-1.2.so", soname="$ORIGIN/real/libbar-1.2.so")
    bar = cc.lib(t / "real/libbar-1.2.so", soname="libbar.so.1")
    cc.lib(t / "lib/liba.so.1", bar)
    prog = cc.exe(t / "prog", stub, t / "lib/liba.so.1", flags=runpath("$ORIGIN/lib"))
    shutil.rmtree(t / "stub")
    return Case(prog, found={"liba.so.1": f"{t}/lib/liba.so.1"}, bare=[str(bar)],
                absent=["libbar.so.1"])


@case("R12-same-file-two-names")
def r12_same_file(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    # libalias.so.1 is a symlink to liba.so.1: found by search, same dev/ino, reused.
    a = cc.lib(t / "lib/liba.so.1")
    alias = cc.lib(t / "lib/libalias.so.1")
    prog = cc.exe(t / "prog", a, alias, flags=runpath("$ORIGIN/lib"))
    alias.unlink()
    alias.symlink_to("liba.so.1")
    return Case(prog, found={"liba.so.1": str(a)}, absent=["libalias.so.1"])


@case("R20-slash-name-no-hwcaps")
def r20_slash_no_hwcaps(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    lib = cc.lib(t / "abs/libabs.so", soname=None)
    for level in host.hwcaps_active:
        cc.lib(t / f"abs/glibc-hwcaps/{level}/libabs.so", soname=None)
    return Case(cc.exe(t / "prog", lib), bare=[str(lib)])


@case("R27-symlinked-program")
def r27_symlinked_program(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    # $ORIGIN of a program is its real directory; a decoy waits where the link points from.
    cc.lib(t / "real/lib/liba.so.1")
    cc.lib(t / "lib/liba.so.1")
    cc.exe(t / "real/bin/prog", t / "real/lib/liba.so.1", flags=runpath("$ORIGIN/../lib"))
    (t / "links").mkdir()
    (t / "links/prog").symlink_to("../real/bin/prog")
    return Case(t / "links/prog", found={"liba.so.1": f"{t}/real/bin/../lib/liba.so.1"})


@case("R27-library-via-symlink")
def r27_library_via_symlink(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    # A library's $ORIGIN is the directory of the name it was opened by, not its realpath.
    cc.lib(t / "links/libb.so.1")
    cc.lib(t / "real/libb.so.1")
    cc.lib(t / "real/liba.so.1", t / "real/libb.so.1", flags=runpath("$ORIGIN"))
    (t / "links/liba.so.1").symlink_to("../real/liba.so.1")
    prog = cc.exe(t / "prog", t / "real/liba.so.1", flags=runpath("$ORIGIN/links"))
    found = {"liba.so.1": f"{t}/links/liba.so.1", "libb.so.1": f"{t}/links/libb.so.1"}
    return Case(prog, found=found)


@case("R31-rpath-origin-of-owner")
def r31_rpath_origin_of_owner(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    # libc2 is found through liba's inherited RPATH $ORIGIN/sub, expanded against liba (A/),
    # not against the requester libb (B/), where a decoy waits.
    cc.lib(t / "A/sub/libc2.so.1")
    cc.lib(t / "B/sub/libc2.so.1")
    cc.lib(t / "B/libb.so.1", t / "A/sub/libc2.so.1")
    cc.lib(t / "A/liba.so.1", t / "B/libb.so.1", flags=rpath("$ORIGIN/sub"))
    prog = cc.exe(t / "prog", t / "A/liba.so.1", flags=rpath("$ORIGIN/A:$ORIGIN/B"))
    found = {"liba.so.1": f"{t}/A/liba.so.1", "libb.so.1": f"{t}/B/libb.so.1",
             "libc2.so.1": f"{t}/A/sub/libc2.so.1"}
    return Case(prog, found=found)


@case("R31-own-rpath-first")
def r31_own_rpath_first(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    for sub in ("x", "y"):
        cc.lib(t / sub / "libc2.so.1")
    cc.lib(t / "x/liba.so.1", t / "y/libc2.so.1", flags=rpath("$ORIGIN/../y"))
    prog = cc.exe(t / "prog", t / "x/liba.so.1", flags=rpath("$ORIGIN/x"))
    found = {"liba.so.1": f"{t}/x/liba.so.1", "libc2.so.1": f"{t}/x/../y/libc2.so.1"}
    return Case(prog, found=found)


@case("R33-llp-origin")
def r33_llp_origin(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    # $ORIGIN in LD_LIBRARY_PATH expands against the program.
    cc.lib(t / "work/liba.so.1")
    prog = cc.exe(t / "bin/prog", t / "work/liba.so.1")
    return Case(prog, env={"LD_LIBRARY_PATH": "$ORIGIN/../work"},
                found={"liba.so.1": f"{t}/bin/../work/liba.so.1"})


@case("R36-nodefaultlib", fails=True)
def r36_nodefaultlib(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = cc.exe(t / "prog", LIBZ, flags=["-Wl,-z,nodefaultlib"])
    return Case(prog, missing={"libz.so.1": "prog", "libc.so.6": "prog"})


@case("R36-nodefaultlib-llp")
def r36_nodefaultlib_llp(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = cc.exe(t / "prog", LIBZ, flags=["-Wl,-z,nodefaultlib"])
    return Case(prog, env={"LD_LIBRARY_PATH": DEFAULT_DIR},
                found={"libz.so.1": LIBZ, "libc.so.6": LIBC})


@case("R45-only-wrong-class", fails=True)
def r45_only_wrong_class(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    cc.lib(t / "d64/liba.so.1")
    cc.lib32(t / "d32/liba.so.1")
    prog = cc.exe(t / "prog", t / "d64/liba.so.1", flags=runpath("$ORIGIN/d32"))
    return Case(prog, missing={"liba.so.1": "prog"}, run_stderr="wrong ELF class: ELFCLASS32")


@case("R46-directory", fails=True)
def r46_directory(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = _decoy_first(t, cc, "bad")
    (t / "bad/liba.so.1").mkdir()
    return _fatal(t, prog, "cannot read file data: Error 21")


@case("R53-numeric-cache-key")
def r53_numeric_cache_key(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    # DT_NEEDED libz.so.01 matches the cache key libz.so.1: digit runs compare as numbers.
    stub = cc.lib(t / "stub/libz.so.01")
    prog = cc.exe(t / "prog", stub)
    shutil.rmtree(t / "stub")
    return Case(prog, found={"libz.so.01": LIBZ})


# --- musl (loader.md 9.2 m1-m4, section 10) -----------------------------------------------


@case("m1", musl=True)
def m1(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    # musl inherits the program's RUNPATH: liba (no rpath) finds libb in x/.
    cc.lib(t / "x/libb.so.1")
    cc.lib(t / "app/lib/liba.so.1", t / "x/libb.so.1")
    prog = cc.exe(t / "app/bin/prog", t / "app/lib/liba.so.1",
                  flags=runpath(f"$ORIGIN/../lib:{t}/x"))
    found = {"liba.so.1": f"{t}/app/bin/../lib/liba.so.1", "libb.so.1": f"{t}/x/libb.so.1"}
    return Case(prog, found=found)


@case("m2", musl=True)
def m2(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    prog = _two_dirs(t, cc, "rp", rpath("$ORIGIN/rp"))
    return Case(prog, env={"LD_LIBRARY_PATH": f"{t}/llp"},
                found={"liba.so.1": f"{t}/llp/liba.so.1"})


@case("m3", fails=True, musl=True)
def m3(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    Toolchain("gcc").lib32(t / "d32/liba.so.1")
    cc.lib(t / "d64/liba.so.1")
    prog = cc.exe(t / "prog", t / "d64/liba.so.1")
    return Case(prog, env={"LD_LIBRARY_PATH": f"{t}/d32:{t}/d64"},
                fatal="Error loading shared library liba.so.1: Exec format error",
                bad_file=f"{t}/d32/liba.so.1")


@case("m4", fails=True, musl=True)
def m4(t: Path, cc: Toolchain, host: HostLoader) -> Case:
    # musl's path file leaves out the glibc directory that holds libz.so.1.
    stub = cc.lib(t / "stub/libz.so.1")
    prog = cc.exe(t / "prog", stub)
    shutil.rmtree(t / "stub")
    return Case(prog, missing={"libz.so.1": "prog"})


# --- the three checks ---------------------------------------------------------------------


@dataclass
class Built:
    case: Case
    trace: Trace
    ran: subprocess.CompletedProcess[str]  # the real run of `prog --objects`


def observe(c: Case) -> Built:
    """Ask the real loader: its trace, and a real run of the program."""
    if c.musl:
        trace = musl_trace(c.program, env=c.env)
    else:
        trace = loader_trace(c.program, env=c.env, cwd=c.cwd)
    return Built(c, trace, run([c.program, "--objects"], env=c.env, cwd=c.cwd))


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
    gcc: Toolchain,
    host_loader: HostLoader,
    request: pytest.FixtureRequest,
) -> Callable[[str], Built]:
    """Builds each case once per module, in its own directory, and observes it."""
    cache: dict[str, Built] = {}

    def get(case_id: str) -> Built:
        if case_id not in cache:
            entry = CASES[case_id]
            cc = request.getfixturevalue("musl_gcc") if entry.musl else gcc
            t = tmp_path_factory.mktemp(case_id.replace("-", "_")).resolve()
            c = entry.build(t, cc, host_loader)
            c.musl = entry.musl
            assert c.loads != entry.fails, f"{case_id}: registered with fails={entry.fails}"
            cache[case_id] = observe(c)
        return cache[case_id]

    return get


def check_oracle(b: Built) -> None:
    """The real loader does what loader.md says for this case."""
    c, trace, ran = b.case, b.trace, b.ran
    where = f"trace:\n{trace.stdout}{trace.stderr}"
    if c.fatal:
        assert trace.rc == 127 and c.fatal in trace.stderr, where
        assert ran.returncode == 127 and c.fatal in ran.stderr, ran.stderr
        return
    for name, path in c.found.items():
        assert trace.opened(name) == path, f"{name}: expected {path!r}\n{where}"
    for path in c.bare:
        assert path in trace.bare, f"{path!r} not loaded as written\n{where}"
    assert sorted(trace.missing) == sorted(c.missing), where
    for name in c.absent:
        assert trace.opened(name) is None and name not in trace.missing, where
        others = trace.paths - {HOST_LOADER}
        assert not any(os.path.basename(p) == name for p in others), where
    assert c.run_stderr in ran.stderr, ran.stderr
    if c.loads:
        assert ran.returncode == 0 and "sample ok" in ran.stdout, ran.stderr
        assert c.output in ran.stdout
        # The objects the running program sees are the ones the trace named.
        assert printed_objects(ran.stdout) == trace.paths, ran.stdout
    else:
        assert ran.returncode == 127, ran.stderr
        if not c.musl and not c.run_stderr:
            assert "cannot open shared object file" in ran.stderr, ran.stderr


def check_deps(b: Built) -> None:
    """`rpack deps --json` maps what the loader maps, by the same strings, or fails as it does."""
    c, trace = b.case, b.trace
    proc, deps = rpack_deps(c.program, env=c.env, cwd=c.cwd)
    shown = f"rpack deps exited {proc.returncode}\n{proc.stdout}{proc.stderr}"

    if c.fatal:
        errors = error_lines(proc.stderr)
        assert proc.returncode == 1 and len(errors) == 1, shown
        assert names_file(errors[0], c.bad_file), f"expected {c.bad_file!r} named\n{shown}"
        return

    if c.missing:
        errors = error_lines(proc.stderr)
        assert proc.returncode == 1 and len(errors) == 1, shown
        assert any(name in errors[0] and needer in errors[0]
                   for name, needer in c.missing.items()), shown
        proc, deps = rpack_deps(c.program, env=c.env, cwd=c.cwd, allow_missing=True)
        shown = f"rpack deps --allow-missing exited {proc.returncode}\n{proc.stdout}{proc.stderr}"
        assert proc.returncode == 0, shown
        missing = {m["name"]: os.path.basename(m["needed_by"]) for m in deps["missing"]}
        assert missing == c.missing, shown

    assert proc.returncode == 0, shown
    interp = MUSL_LOADER if c.musl else HOST_LOADER
    assert deps["interpreter"] == interp, shown
    assert len(deps["programs"]) == 1 and os.path.samefile(deps["programs"][0], c.program)
    # The trace leaves the loader out when no object needs it by name (R36's program).
    expected = trace.paths | {interp}
    assert loaded_paths(deps) == expected, f"oracle: {sorted(expected)}\n{shown}"


def names_file(line: str, path: str) -> bool:
    """Whether an error line names `path`, as opened or normalized."""
    return path in line or os.path.normpath(path) in line or os.path.realpath(path) in line


def pack(c: Case, archive: Path) -> None:
    flags = env_args(c.env) + (["--workdir", str(c.cwd)] if c.cwd else [])
    created = rpack("create", *flags, archive, c.program, cwd=c.cwd)
    assert created.returncode == 0, created.stderr


def check_run(b: Built, archive: Path) -> None:
    """The packed program runs in its root and maps the same objects as on the host."""
    c = b.case
    ran = rpack("run", archive, "--objects", timeout=120)
    assert ran.returncode == 0 and "sample ok" in ran.stdout, f"{ran.stdout}{ran.stderr}"
    assert c.output in ran.stdout
    assert printed_objects(ran.stdout) == b.trace.paths, ran.stdout


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_oracle(case_id: str, built: Callable[[str], Built]) -> None:
    check_oracle(built(case_id))


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_deps(case_id: str, built: Callable[[str], Built]) -> None:
    b = built(case_id)
    check_oracle(b)
    check_deps(b)


@needs_root
@pytest.mark.parametrize("case_id", sorted(k for k, entry in CASES.items() if not entry.fails))
def test_packed(case_id: str, built: Callable[[str], Built], tmp_path: Path) -> None:
    b = built(case_id)
    check_oracle(b)
    pack(b.case, tmp_path / "case.tar.zst")
    check_run(b, tmp_path / "case.tar.zst")


@needs_root
def test_packed_root_keeps_the_loader_path(gcc: Toolchain, tmp_path: Path) -> None:
    """Every directory symlink on the PT_INTERP path is in the root with the host's target,
    and the path leads to the loader (R5, r11; format.md 3 stores the loader itself as a
    file)."""
    c = Case(gcc.exe(tmp_path / "prog"))
    pack(c, tmp_path / "prog.tar.zst")
    members = archive_members(tmp_path / "prog.tar.zst")

    hop = Path("/")
    for part in Path(HOST_LOADER).parent.parts[1:]:
        hop /= part
        if hop.is_symlink():
            member = members.get(str(hop)[1:])
            assert member is not None and member.issym(), f"{hop} is not a symlink in the root"
            assert member.linkname == os.readlink(hop)
    name = resolve_member(members, HOST_LOADER)
    assert name is not None and (members[name].isfile() or members[name].islnk()), name


# --- libraries found only through /etc/ld.so.cache (loader.md R50-R56, host versions of r3-r8)


CONF_IDS = ["conf-dir", "conf-hwcaps", "conf-stale-entry", "conf-wrong-class"]
HWCAPS = ["x86-64-v2", "x86-64-v3"]


def ldconfig(*args: str | Path) -> str:
    proc = run(["ldconfig", *args])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def cache_entries(listing: str) -> list[tuple[str, str, str]]:
    """`ldconfig -p` lines as (key, flags, path)."""
    return [(m[1], m[2], m[3]) for line in listing.splitlines()
            if (m := re.match(r"^\t(\S+) \((.*)\) => (.+)$", line))]


@pytest.fixture(scope="module")
def conf_cases(
    tmp_path_factory: pytest.TempPathFactory, gcc: Toolchain, host_loader: HostLoader
) -> Iterator[dict[str, Built]]:
    """A directory registered in /etc/ld.so.conf.d for the module's tests, then removed.

    Its libraries have names no host package uses: librpk*.so.1.
    """
    if not IS_ROOT:
        pytest.skip("needs root: writes /etc/ld.so.conf.d and runs ldconfig")
    t = tmp_path_factory.mktemp("ldconf").resolve()
    lib = t / "lib"
    gcc.lib(lib / "librpkconf.so.1")
    gcc.lib(lib / "librpkhw.so.1")
    for level in HWCAPS:
        gcc.lib(lib / f"glibc-hwcaps/{level}/librpkhw.so.1", flags=[f"-march={level}"])
    gcc.lib(lib / "librpkstale.so.1")
    gcc.lib32(lib / "librpkq.so.1")
    gcc.lib(t / "stub/librpkq.so.1")
    cases = {
        "conf-dir": Case(gcc.exe(t / "conf/prog", lib / "librpkconf.so.1"),
                         found={"librpkconf.so.1": f"{lib}/librpkconf.so.1"}),
        "conf-hwcaps": Case(gcc.exe(t / "hwcaps/prog", lib / "librpkhw.so.1"),
                            found={"librpkhw.so.1": _best(host_loader, str(lib), HWCAPS)
                                   + "/librpkhw.so.1"}),
        "conf-stale-entry": Case(gcc.exe(t / "stale/prog", lib / "librpkstale.so.1"),
                                 missing={"librpkstale.so.1": "prog"}),
        "conf-wrong-class": Case(gcc.exe(t / "class/prog", t / "stub/librpkq.so.1"),
                                 missing={"librpkq.so.1": "prog"}),
    }

    conf = Path(f"/etc/ld.so.conf.d/zz-rpack-test-{os.getpid()}.conf")
    conf.write_text(f"{lib}\n")
    try:
        ldconfig()
        # The cache now names a file that is gone: the loader tries it and moves on (R55).
        (lib / "librpkstale.so.1").unlink()
        yield {case_id: observe(c) for case_id, c in cases.items()}
    finally:
        conf.unlink(missing_ok=True)
        ldconfig()


@needs_root
@pytest.mark.parametrize("case_id", CONF_IDS)
def test_ld_so_conf_dir(
    case_id: str, conf_cases: dict[str, Built], tmp_path: Path
) -> None:
    b = conf_cases[case_id]
    lib = b.case.program.parent.parent / "lib"
    entries = cache_entries(ldconfig("-p"))
    if case_id == "conf-wrong-class":
        # Listed, but with 32-bit flags the x86_64 loader does not accept (R52, r8).
        assert ("librpkq.so.1", "ELF", f"{lib}/librpkq.so.1") in entries
    else:
        assert any(path.startswith(f"{lib}/") for _, _, path in entries), "cache not updated"
    check_oracle(b)
    check_deps(b)
    if not b.case.loads:
        return

    archive = tmp_path / "case.tar.zst"
    pack(b.case, archive)
    # The loader alone finds it: no search-path variable is set for the run.
    env = json.loads(archive_read(archive, ".rpack/manifest.json"))["env"]
    assert not {"LD_LIBRARY_PATH", "LD_PRELOAD"} & set(env), env
    # The root's own cache, read by the real ldconfig, lists the library (R50, r-w).
    cache = tmp_path / "ld.so.cache"
    cache.write_bytes(archive_read(archive, "etc/ld.so.cache"))
    packed = cache_entries(ldconfig("-p", "-C", cache))
    for name, path in b.case.found.items():
        assert any(key == name and p == path for key, _, p in packed), packed
    if case_id == "conf-hwcaps":
        # The baseline and every variant travel, whatever this CPU picked (R38).
        members = archive_members(archive)
        for sub in ["", *(f"glibc-hwcaps/{level}/" for level in HWCAPS)]:
            assert resolve_member(members, f"{lib}/{sub}librpkhw.so.1"), sub
    check_run(b, archive)


# --- loader.md 9.2: a hand-made root, run chrooted (what rpack's roots rely on) -----------


@pytest.fixture
def mini_root(tmp_path: Path) -> Path:
    """loader.md 9.2's root: merged /usr, the loader and libc, /opt/x/lib in ld.so.conf."""
    root = tmp_path / "root"
    for sub in ("usr/bin", "usr/lib/x86_64-linux-gnu", "usr/lib64", "etc/ld.so.conf.d",
                "opt/x/lib", "proc"):
        (root / sub).mkdir(parents=True)
    for link, target in (("lib", "usr/lib"), ("lib64", "usr/lib64"), ("bin", "usr/bin")):
        (root / link).symlink_to(target)
    (root / "usr/lib64/ld-linux-x86-64.so.2").symlink_to(f"{DEFAULT_DIR}/ld-linux-x86-64.so.2")
    for name in ("ld-linux-x86-64.so.2", "libc.so.6"):
        shutil.copy2(os.path.realpath(f"{DEFAULT_DIR}/{name}"), root / DEFAULT_DIR[1:] / name)
    (root / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    (root / "etc/ld.so.conf.d/opt.conf").write_text("/opt/x/lib\n")
    return root


def in_root(root: Path, *argv: str, env: dict[str, str] | None = None) -> Trace:
    """Run inside `root` (chroot, no /proc); parsed as a trace if it printed one."""
    return parse_trace(run(argv, env=env, chroot=root))


def trace_in_root(root: Path, *argv: str, env: dict[str, str] | None = None) -> Trace:
    return in_root(root, *argv, env={**(env or {}), "LD_TRACE_LOADED_OBJECTS": "1"})


def with_proc(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run inside `root` with /proc mounted, in a private mount namespace."""
    return run(["unshare", "--mount", "--propagation", "private", f"--mount-proc={root}/proc",
                "chroot", str(root), *argv])


@needs_root
def test_r1_no_cache_uses_default_dirs(mini_root: Path, gcc: Toolchain) -> None:
    gcc.exe(mini_root / "usr/bin/prog")
    assert not (mini_root / "etc/ld.so.cache").exists()
    ran = in_root(mini_root, "/usr/bin/prog", "--objects")
    assert ran.rc == 0 and printed_objects(ran.stdout) == {LIBC, HOST_LOADER}, ran.stderr


@needs_root
def test_r2_r3_conf_dir_needs_the_cache(mini_root: Path, gcc: Toolchain) -> None:
    gcc.exe(mini_root / "usr/bin/prog", gcc.lib(mini_root / "opt/x/lib/libx.so.1"))
    assert trace_in_root(mini_root, "/usr/bin/prog").missing == ["libx.so.1"]  # r2

    ldconfig("-r", mini_root)
    assert trace_in_root(mini_root, "/usr/bin/prog").found["libx.so.1"] == "/opt/x/lib/libx.so.1"
    paths = [path for _, _, path in cache_entries(ldconfig("-r", mini_root, "-p"))]
    assert f"{DEFAULT_DIR}/libc.so.6" in paths
    assert all(p.startswith((f"{DEFAULT_DIR}/", "/opt/x/lib/")) for p in paths), paths  # R51


@needs_root
def test_r4_hwcaps_in_cache(mini_root: Path, gcc: Toolchain, host_loader: HostLoader) -> None:
    base = mini_root / DEFAULT_DIR[1:]
    gcc.exe(mini_root / "usr/bin/prog", gcc.lib(base / "libh.so.1"))
    for level in HWCAPS:
        gcc.lib(base / f"glibc-hwcaps/{level}/libh.so.1", flags=[f"-march={level}"])
    ldconfig("-r", mini_root)

    entries = cache_entries(ldconfig("-r", mini_root, "-p"))
    flags = [f for key, f, _ in entries if key == "libh.so.1"]
    assert sorted(flags[:-1]) == [f'libc6,x86-64, hwcap: "{level}"' for level in HWCAPS]
    assert flags[-1] == "libc6,x86-64", flags  # the hwcaps entries come first
    best = _best(host_loader, DEFAULT_DIR, HWCAPS) + "/libh.so.1"
    assert trace_in_root(mini_root, "/usr/bin/prog").found["libh.so.1"] == best
    # The directory probe gives the same answer without the cache.
    listed = in_root(mini_root, HOST_LOADER, "--inhibit-cache", "--list", "/usr/bin/prog")
    assert listed.found["libh.so.1"] == best
    if "x86-64-v2" in host_loader.hwcaps_active:
        masked = in_root(mini_root, HOST_LOADER, "--glibc-hwcaps-mask", "x86-64-v2",
                         "--list", "/usr/bin/prog")
        assert masked.found["libh.so.1"] == f"{DEFAULT_DIR}/glibc-hwcaps/x86-64-v2/libh.so.1"


@needs_root
def test_r5_stale_cache_entry_falls_through(mini_root: Path, gcc: Toolchain) -> None:
    gcc.exe(mini_root / "usr/bin/prog", gcc.lib(mini_root / "opt/x/lib/libx.so.1"))
    ldconfig("-r", mini_root)
    (mini_root / "opt/x/lib/libx.so.1").rename(mini_root / DEFAULT_DIR[1:] / "libx.so.1")
    found = trace_in_root(mini_root, "/usr/bin/prog").found
    assert found["libx.so.1"] == f"{DEFAULT_DIR}/libx.so.1"


@needs_root
def test_r6_ld_so_preload(mini_root: Path, gcc: Toolchain) -> None:
    gcc.lib(mini_root / "opt/x/lib/libpre.so.1")
    gcc.exe(mini_root / "usr/bin/prog")
    ldconfig("-r", mini_root)
    (mini_root / "etc/ld.so.preload").write_text("# comment\nlibpre.so.1\n")
    pre = "/opt/x/lib/libpre.so.1"
    assert trace_in_root(mini_root, "/usr/bin/prog").found["libpre.so.1"] == pre
    ran = in_root(mini_root, "/usr/bin/prog", "--objects")
    objects = [line for line in ran.stdout.splitlines() if line.startswith("object: /")]
    assert objects[0] == f"object: {pre}", objects  # preloads come first


def _origin_apps(root: Path, cc: Toolchain) -> None:
    lib = cc.lib(root / "opt/app/lib/liba.so.1")
    cc.exe(root / "opt/app/bin/app", lib, flags=runpath("$ORIGIN/../lib"))
    orig = cc.lib(root / "opt/app/lib/liborig.so", soname="$ORIGIN/../lib/liborig.so",
                  defines={"FN": "orig_fn"})
    cc.exe(root / "opt/app/bin/orig", orig, defines={"CALL": "orig_fn"})


@needs_root
def test_r7_origin_needs_proc(mini_root: Path, gcc: Toolchain) -> None:
    _origin_apps(mini_root, gcc)
    app = "/opt/app/bin/app"
    bare = in_root(mini_root, app)
    assert bare.rc == 127 and "liba.so.1: cannot open shared object file" in bare.stderr  # r7
    assert in_root(mini_root, app, env={"LD_ORIGIN_PATH": "/opt/app/bin"}).rc == 0  # r7b
    assert in_root(mini_root, HOST_LOADER, app).rc == 0  # r7c
    assert with_proc(mini_root, app).returncode == 0  # r7d


@needs_root
def test_r7e_origin_needed_entry_dropped_without_proc(mini_root: Path, gcc: Toolchain) -> None:
    _origin_apps(mini_root, gcc)
    dropped = in_root(mini_root, "/opt/app/bin/orig")
    assert dropped.rc == 127, dropped.stderr
    assert "symbol lookup error" in dropped.stderr and "undefined symbol: orig_fn" in dropped.stderr
    ran = with_proc(mini_root, "/opt/app/bin/orig")
    assert ran.returncode == 0 and "call: orig_fn" in ran.stdout, ran.stderr


@needs_root
def test_r8_wrong_class_cache_entry(mini_root: Path, gcc: Toolchain, tmp_path: Path) -> None:
    gcc.lib32(mini_root / "opt/x/lib/libq.so.1")
    stub = gcc.lib(tmp_path / "stub/libq.so.1")
    gcc.exe(mini_root / "usr/bin/prog", stub)
    ldconfig("-r", mini_root)
    entries = cache_entries(ldconfig("-r", mini_root, "-p"))
    assert ("libq.so.1", "ELF", "/opt/x/lib/libq.so.1") in entries
    assert trace_in_root(mini_root, "/usr/bin/prog").missing == ["libq.so.1"]

    copy(stub, mini_root / DEFAULT_DIR[1:] / "libq.so.1")  # the cache is not rerun
    found = trace_in_root(mini_root, "/usr/bin/prog").found
    assert found["libq.so.1"] == f"{DEFAULT_DIR}/libq.so.1"


@needs_root
def test_r11_missing_interpreter_link(mini_root: Path, gcc: Toolchain) -> None:
    gcc.exe(mini_root / "usr/bin/prog")
    (mini_root / "lib64").unlink()
    assert (mini_root / "usr/bin/prog").is_file()
    with pytest.raises(FileNotFoundError):
        in_root(mini_root, "/usr/bin/prog")
