"""What programs load at run time, beyond DT_NEEDED: glibc's dlopen'ed families and data.

Decided from the packed objects alone (loader.md sections 11 and 12); nothing is run:

* libgcc_s.so.1 whenever glibc's libc is packed (R72), and the C.utf8 locale (R74, 400 KiB).
* The NSS modules the host's nsswitch.conf names, and a generated etc/nsswitch.conf that names
  only the services the root has: files and dns are built into glibc >= 2.34 (R70).
* The gconv modules and their cache (R71) only when a packed object imports iconv_open: the
  tree is 8.2 MiB (2.1 MB compressed), and without iconv the root only has the C and C.UTF-8
  locales, whose charsets glibc converts without modules.
* The libraries named by FDO .note.dlopen notes, in priority order of each entry.
* A few terminfo entries when libtinfo or libncurses is packed (section 12).
* The standard library of Python and Perl when the program is the interpreter itself, and of
  Python when a packed object embeds libpython (R75):
  a user who packs /usr/bin/python3 expects `import json` to work.

Static programs get none of this (R79): glibc >= 2.34 builds files and dns into the static
libc too, and other NSS or gconv modules would need the host's exact glibc build at run time.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache

from .elf import Verdict, check_candidate, dlopen_notes, dynstr_names, glibc_version
from .ldso import LoaderModel
from .resolve import LoadedObject

logger = logging.getLogger(__name__)

NSSWITCH = "/etc/nsswitch.conf"
NSSWITCH_MEMBER = "etc/nsswitch.conf"
# glibc's defaults without a nsswitch.conf (nss/nss_database.c), used when the host has none.
DEFAULT_NSSWITCH = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
LOCALE_DIRS = ("/usr/lib/locale/C.utf8", "/usr/lib/locale/C.UTF-8")
LOCALE_ALIAS = "/usr/share/locale/locale.alias"
# The terminfo search order compiled into libtinfo, and the entries a minimal root needs.
TERMINFO_DIRS = ("/etc/terminfo", "/lib/terminfo", "/usr/share/terminfo")
TERMINFO_ENTRIES = ("x/xterm*", "l/linux*", "v/vt100*", "v/vt220*", "d/dumb", "s/screen*",
                    "t/tmux*")
# Build-time files (libpythonX.Y.a, Makefile: 32 MiB) and the test suite are left out.
PYTHON_SKIP = ("config-*", "test", "idlelib", "turtledemo")
_TOKEN = re.compile(r"\[[^\]]*\]|[^\s\[]+")
_PERL_INC = re.compile(rb"\0(/[\w./+-]*perl[\w./+-]*)\0")


@dataclass(frozen=True)
class Extra:
    path: str       # on the host
    why: str


@dataclass
class Runtime:
    """What to pack for the run-time loads of a set of programs."""

    modules: list[Extra] = field(default_factory=list)    # each gets its own libraries
    trees: list[Extra] = field(default_factory=list)      # data; ELF files in them resolved
    nsswitch: bytes | None = None                          # the root's etc/nsswitch.conf


def collect(executables: list[str], objects: list[LoadedObject], model: LoaderModel | None,
            nsswitch: str = NSSWITCH) -> Runtime:
    """The run-time loads of `executables`, whose packed objects are `objects`."""
    runtime = Runtime()
    for program in executables:
        runtime.trees += standard_library(program)
    for obj in objects:
        runtime.trees += embedded_python(obj)
    if model is None or model.libc != "glibc":
        return runtime
    libc = next((o for o in objects if o.dynamic.soname == "libc.so.6"), None)
    if libc is None:
        return runtime
    found = find_library("libgcc_s.so.1", model)
    if found:
        runtime.modules.append(Extra(found, "glibc dlopens it to unwind (pthread_cancel, R72)"))
    _add_nss(runtime, model, libc, nsswitch)
    runtime.trees += [Extra(p, "the C.UTF-8 locale (R74)") for p in LOCALE_DIRS
                      if os.path.isdir(p) and not os.path.islink(p)]
    if os.path.isfile(LOCALE_ALIAS):
        runtime.trees.append(Extra(LOCALE_ALIAS, "setlocale reads the locale aliases (R74)"))
    runtime.trees += gconv(objects, libc)
    runtime.modules += dlopen_metadata(objects, model)
    runtime.trees += terminfo(objects)
    return runtime


def find_library(name: str, model: LoaderModel) -> str | None:
    """Where dlopen(name) from libc finds a library: the cache, then the default directories.

    XXX: libc has no DT_RPATH or DT_RUNPATH, and LD_LIBRARY_PATH is not consulted here.
    """
    cached = model.cache_lookup(name)
    if cached is not None and os.path.exists(cached):
        return cached
    for directory in model.system_dirs:
        candidate = os.path.join(directory, name)
        if check_candidate(candidate, model.elf_class, model.machine).verdict is Verdict.OK:
            return candidate
    return None


def _add_nss(runtime: Runtime, model: LoaderModel, libc: LoadedObject, nsswitch: str) -> None:
    try:
        with open(nsswitch, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        text = DEFAULT_NSSWITCH
    builtin = _builtin_services(libc)
    modules: dict[str, str | None] = {}

    def packed(service: str) -> bool:
        if service in builtin:
            return True
        if service not in modules:
            modules[service] = find_library(f"libnss_{service}.so.2", model)
            if modules[service] is None:
                logger.info("NSS service %s has no module here; left out of nsswitch.conf",
                            service)
        return modules[service] is not None

    runtime.nsswitch = nsswitch_conf(text, packed)
    runtime.modules += [Extra(path, f"NSS module of service {service} in {nsswitch} (R70)")
                        for service, path in modules.items() if path is not None]


def _builtin_services(libc: LoadedObject) -> set[str]:
    version = glibc_version(os.path.realpath(libc.name))
    parts = tuple(int(p) for p in version.split(".")) if version else (0,)
    return {"files", "dns"} if parts >= (2, 34) else set()


def nsswitch_conf(text: str, packed: Callable[[str], bool]) -> bytes:
    """`text` (an nsswitch.conf) with only the services for which `packed(service)` holds.

    An action such as [NOTFOUND=return] stays with the service before it; a database left
    with no service is dropped, so glibc uses its default for it.
    """
    lines = ["# Generated by rpack from the host's nsswitch.conf: only the services whose",
             "# modules are in this root (files and dns are built into glibc)."]
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        database, _, rest = line.partition(":")
        kept: list[str] = []
        keep_actions = False
        for token in _TOKEN.findall(rest):
            if token.startswith("["):
                if keep_actions:
                    kept.append(token)
            else:
                keep_actions = packed(token)
                if keep_actions:
                    kept.append(token)
        if kept:
            lines.append(f"{database.strip() + ':':<15} {' '.join(kept)}")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def gconv(objects: Iterable[LoadedObject], libc: LoadedObject) -> list[Extra]:
    """The gconv tree, when a packed object other than libc calls iconv_open (R71)."""
    users = [o.name for o in objects if o is not libc and o.dynamic.soname != "libc.so.6"
             and b"iconv_open" in _dynstr(os.path.realpath(o.name))]
    if not users:
        return []
    # XXX: glibc's GCONV_PATH default is compiled in; it is libc's own directory on every
    # multiarch and lib64 layout seen, reached here through libc's real path.
    directory = os.path.join(os.path.dirname(os.path.realpath(libc.name)), "gconv")
    if not os.path.isdir(directory):
        logger.warning("%s call iconv_open but %s does not exist", users[0], directory)
        return []
    return [Extra(directory, f"gconv modules and cache: {users[0]} calls iconv_open (R71)")]


@cache
def _dynstr(path: str) -> set[bytes]:
    return dynstr_names(path)


def dlopen_metadata(objects: Iterable[LoadedObject], model: LoaderModel) -> list[Extra]:
    """The libraries FDO .note.dlopen notes name: for each entry, the first soname found."""
    import json

    extras = []
    for obj in objects:
        for text in dlopen_notes(os.path.realpath(obj.name)):
            try:
                entries = json.loads(text)
            except ValueError:
                logger.warning("%s: a .note.dlopen note is not JSON; ignored", obj.name)
                continue
            for entry in entries if isinstance(entries, list) else []:
                names = entry.get("soname", []) if isinstance(entry, dict) else []
                found = next((p for p in map(lambda n: find_library(str(n), model), names)
                              if p), None)
                feature = entry.get("feature", "?") if isinstance(entry, dict) else "?"
                if found is None:
                    logger.info("%s: .note.dlopen %s (%s): not on this host", obj.name,
                                names, feature)
                    continue
                priority = entry.get("priority", "recommended")
                extras.append(Extra(found, f".note.dlopen of {obj.name}: feature {feature}, "
                                           f"{priority}"))
    return extras


def terminfo(objects: Iterable[LoadedObject]) -> list[Extra]:
    """The common terminal descriptions, when a packed object reads terminfo (section 12)."""
    user = next((o.name for o in objects if (o.dynamic.soname or "").startswith(
        ("libtinfo", "libncurses"))), None)
    if user is None:
        return []
    extras = []
    for directory in TERMINFO_DIRS:
        for pattern in TERMINFO_ENTRIES:
            for path in sorted(glob.glob(os.path.join(directory, pattern))):
                if os.path.isfile(path):
                    extras.append(Extra(path, f"terminfo entry read through {user}"))
    return extras


def standard_library(program: str) -> list[Extra]:
    """The standard library trees of an interpreter, when `program` is one (R75)."""
    real = os.path.realpath(program)
    name = os.path.basename(real)
    if re.fullmatch(r"python(\d+\.\d+)", name):
        return _python_stdlib(real, name, f"the standard library of {program} (R75)")
    if re.fullmatch(r"perl(5[\d.]*)?", name):
        return [Extra(d, f"@INC directory of {program}") for d in _perl_inc(real)]
    return []


def embedded_python(obj: LoadedObject) -> list[Extra]:
    """The standard library of a libpython that a program embeds (gdb, vim): without it the
    interpreter aborts at start-up, as the program's own does."""
    version = re.fullmatch(r"libpython(\d+\.\d+)\.so(\.[\d.]+)?", obj.dynamic.soname or "")
    if version is None:
        return []
    return _python_stdlib(os.path.realpath(obj.name), f"python{version.group(1)}",
                          f"the standard library of {obj.dynamic.soname}, embedded (R75)")


def _python_stdlib(real: str, name: str, why: str) -> list[Extra]:
    # Python's getpath: the prefix is the first ancestor with lib/pythonX.Y/os.py.
    directory = os.path.dirname(real)
    while directory != "/":
        directory = os.path.dirname(directory)
        stdlib = os.path.join(directory, "lib", name)
        if os.path.isfile(os.path.join(stdlib, "os.py")):
            return [Extra(os.path.join(stdlib, entry), why) for entry in sorted(os.listdir(stdlib))
                    if not any(fnmatch.fnmatchcase(entry, g) for g in PYTHON_SKIP)]
    return []


def _perl_inc(perl: str) -> list[str]:
    """The @INC directories compiled into a perl binary that exist on this host."""
    try:
        with open(perl, "rb") as f:
            data = f.read()
    except OSError:
        return []
    found: list[str] = []
    for match in _PERL_INC.finditer(data):
        path = match.group(1).decode()
        if path.startswith("/usr/lib/debug/") or path in found or not os.path.isdir(path):
            continue
        found.append(path)
    return found
