"""The host's dynamic loader as a model: its directories, tokens, hwcaps levels and cache."""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
from dataclasses import dataclass, replace
from functools import cache

from . import ldcache
from .elf import ET_DYN, MACHINES, Header, read_dynamic, read_header
from .errors import PackError

logger = logging.getLogger(__name__)

HOST_CACHE = "/etc/ld.so.cache"
MUSL_DEFAULT_PATH = ("/lib", "/usr/local/lib", "/usr/lib")
# The glibc loaders' ABI paths (PT_INTERP) by ELF class and machine: where the host's own
# system loader is looked for when a program names one rpack does not trust to run.
SYSTEM_LOADERS = {
    (64, 62): "/lib64/ld-linux-x86-64.so.2", (32, 3): "/lib/ld-linux.so.2",
    (64, 183): "/lib/ld-linux-aarch64.so.1", (32, 40): "/lib/ld-linux-armhf.so.3",
    (64, 21): "/lib64/ld64.so.2", (64, 22): "/lib/ld64.so.1",
    (64, 243): "/lib/ld-linux-riscv64-lp64d.so.1",
}


@dataclass(frozen=True)
class LoaderModel:
    """What rpack needs to know of one loader to predict which files it maps."""

    interp: str                     # the loader's path, as PT_INTERP names it
    libc: str                       # "glibc" or "musl"
    elf_class: int
    machine: int
    system_dirs: tuple[str, ...]    # the default directories, without trailing slashes
    lib: str = ""                   # $LIB
    platform: str = ""              # $PLATFORM
    hwcaps: tuple[str, ...] = ()    # active glibc-hwcaps subdirectories, best first
    legacy: tuple[str, ...] = ()    # legacy hwcap subdirectories in probe order (glibc < 2.37)
    cache: tuple[ldcache.CacheEntry, ...] = ()
    cache_flags: int | None = None

    @property
    def subdirs(self) -> tuple[str, ...]:
        """The subdirectories probed in every search directory, before the directory itself."""
        return tuple(f"glibc-hwcaps/{h}" for h in self.hwcaps) + self.legacy

    @property
    def machine_name(self) -> str:
        return MACHINES.get(self.machine, f"e_machine {self.machine}")

    def cache_lookup(self, name: str) -> str | None:
        return ldcache.lookup(list(self.cache), name, self.cache_flags, list(self.hwcaps))


@cache
def probe(interp: str) -> LoaderModel:
    """Build the model of the loader at `interp` (a path on this host)."""
    if not os.path.exists(interp):
        raise PackError(f"the program's interpreter {interp!r} does not exist on this host")
    header = read_header(interp)
    if re.match(r"ld-musl-", os.path.basename(interp)):
        return _probe_musl(interp, header.elf_class, header.machine)
    doubt = distrust(interp) or _not_a_loader(interp)
    if doubt is None:
        return _probe_glibc(interp, header.elf_class, header.machine)
    system = SYSTEM_LOADERS.get((header.elf_class, header.machine))
    if system is not None and os.path.exists(system) and distrust(system) is None \
            and _same_abi(read_header(system), header):
        logger.warning("not running the program's interpreter %r to probe it (%s); assuming "
                       "it searches as the host's loader %s does", interp, doubt, system)
        return replace(probe(system), interp=interp)
    logger.warning("not running the program's interpreter %r to probe it (%s), and this host "
                   "has no trusted loader for it; assuming glibc's built-in defaults",
                   interp, doubt)
    return _glibc_defaults(interp, header.elf_class, header.machine)


def _same_abi(a: Header, b: Header) -> bool:
    return (a.elf_class, a.machine, a.little_endian) == (b.elf_class, b.machine, b.little_endian)


def _not_a_loader(path: str) -> str | None:
    """Why the file at `path` cannot be a dynamic loader, whose options are then unknown."""
    dynamic = read_dynamic(path)
    if dynamic.header.e_type != ET_DYN or dynamic.interp is not None:
        return "it is not a dynamic loader: a loader is a shared object without PT_INTERP"
    return None


def distrust(path: str) -> str | None:
    """Why rpack must not execute the file at `path`, or None if it may.

    A file is trusted when its real path and every directory above it belong to root and are
    writable by neither group nor others: no one but root can have put or changed it there
    (the rule sudo and sshd apply to the files they run or read).
    """
    real = os.path.realpath(path)
    current = real
    while True:
        try:
            st = os.stat(current)
        except OSError as e:
            return f"cannot examine {current}: {e.strerror}"
        what = "it" if current == real else current
        if st.st_uid != 0:
            return f"{what} is not owned by root"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{what} is writable by users other than root"
        if current == "/":
            return None
        current = os.path.dirname(current)


def _glibc_defaults(interp: str, elf_class: int, machine: int) -> LoaderModel:
    # glibc's compiled-in search path without a distribution's multiarch directories.
    lib = "lib64" if elf_class == 64 else "lib"
    return LoaderModel(interp=interp, libc="glibc", elf_class=elf_class, machine=machine,
                       system_dirs=(f"/{lib}", f"/usr/{lib}"), lib=lib, cache=_host_cache(),
                       cache_flags=ldcache.required_flags(MACHINES.get(machine, ""), elf_class))


def _host_cache() -> tuple[ldcache.CacheEntry, ...]:
    try:
        with open(HOST_CACHE, "rb") as f:
            return tuple(ldcache.parse_cache(f.read()))
    except FileNotFoundError:
        logger.info("no %s on this host; libraries are found by directory search only",
                    HOST_CACHE)
    except (OSError, ldcache.LdCacheError) as e:
        raise PackError(f"cannot read the host's {HOST_CACHE}: {e}") from None
    return ()


def _run_loader(interp: str, option: str) -> str:
    try:
        # The real path: the file whose trust was checked, whatever its symlinks point to now.
        done = subprocess.run([os.path.realpath(interp), option], capture_output=True,
                              text=True, timeout=30, env={"LC_ALL": "C"}, check=False)
    except OSError as e:
        raise PackError(f"cannot run the loader {interp!r} to probe it: {e.strerror}") from None
    return done.stdout


def _probe_glibc(interp: str, elf_class: int, machine: int) -> LoaderModel:
    diagnostics = _parse_diagnostics(_run_loader(interp, "--list-diagnostics"))
    if "dl_dst_lib" not in diagnostics:
        raise PackError(f"the loader {interp!r} does not answer --list-diagnostics",
                        hint="rpack needs glibc 2.33 or newer on the packing host")
    system_dirs = tuple(
        diagnostics[key].rstrip("/") or "/"
        for key in sorted((k for k in diagnostics if k.startswith("path.system_dirs[")),
                          key=lambda k: int(k[k.index("[") + 1:-1], 16)))
    subdirs = [s for s in diagnostics.get("dl_hwcaps_subdirs", "").split(":") if s]
    active_mask = int(diagnostics.get("dl_hwcaps_subdirs_active", "0"), 0)
    hwcaps = tuple(s for i, s in enumerate(subdirs) if active_mask & (1 << i))
    entries = _host_cache()
    model = LoaderModel(
        interp=interp, libc="glibc", elf_class=elf_class, machine=machine,
        system_dirs=system_dirs, lib=diagnostics["dl_dst_lib"],
        platform=diagnostics.get("dl_platform", ""), hwcaps=hwcaps,
        legacy=_legacy_subdirs(_run_loader(interp, "--help")), cache=entries,
        cache_flags=ldcache.required_flags(MACHINES.get(machine, ""), elf_class))
    logger.debug("loader model of %s: %s", interp, model)
    return model


def _parse_diagnostics(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"')
    return values


def _legacy_subdirs(help_text: str) -> tuple[str, ...]:
    """The legacy hwcap subdirectories of glibc < 2.37, in the order the loader probes them.

    The loader probes every subset of its searched names, largest first, as paths joined in the
    order tls, platform, then the hwcap names (verified with LD_DEBUG=libs on glibc 2.36).
    """
    _, found, section = help_text.partition("Legacy HWCAP subdirectories")
    if not found:
        return ()
    platform: list[str] = []
    tls: list[str] = []
    names: list[str] = []
    for line in section.splitlines()[1:]:
        if not line.startswith("  "):
            break
        name, _, status = line.strip().partition(" ")
        if "searched" not in status:
            continue
        if "AT_PLATFORM" in status:
            platform.append(name)
        elif name == "tls":
            tls.append(name)
        else:
            names.append(name)
    parts = tls + platform + names
    n = len(parts)
    subsets = []
    for mask in range((1 << n) - 1, 0, -1):
        chosen = [parts[i] for i in range(n) if mask & (1 << (n - 1 - i))]
        subsets.append("/".join(chosen))
    return tuple(subsets)


def _probe_musl(interp: str, elf_class: int, machine: int) -> LoaderModel:
    # musl reads <prefix>/etc/ld-musl-ARCH.path, prefix being PT_INTERP less two components.
    arch = re.sub(r"^ld-musl-|\.so\.1$", "", os.path.basename(interp))
    prefix = os.path.dirname(os.path.dirname(interp.rstrip("/")))
    path_file = os.path.join(prefix or "/", "etc", f"ld-musl-{arch}.path")
    try:
        with open(path_file) as f:
            dirs = tuple(d for d in re.split(r"[:\n]", f.read()) if d)
    except FileNotFoundError:
        dirs = MUSL_DEFAULT_PATH
    except OSError:
        dirs = ()
    return LoaderModel(interp=interp, libc="musl", elf_class=elf_class, machine=machine,
                       system_dirs=dirs)
