"""The host's dynamic loader as a model: its directories, tokens, hwcaps levels and cache."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from functools import cache

from . import ldcache
from .elf import MACHINES, read_header
from .errors import PackError

logger = logging.getLogger(__name__)

HOST_CACHE = "/etc/ld.so.cache"
MUSL_DEFAULT_PATH = ("/lib", "/usr/local/lib", "/usr/lib")


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
    return _probe_glibc(interp, header.elf_class, header.machine)


def _run_loader(interp: str, option: str) -> str:
    try:
        done = subprocess.run([interp, option], capture_output=True, text=True, timeout=30,
                              env={"LC_ALL": "C"}, check=False)
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
    entries: tuple[ldcache.CacheEntry, ...] = ()
    try:
        with open(HOST_CACHE, "rb") as f:
            entries = tuple(ldcache.parse_cache(f.read()))
    except FileNotFoundError:
        logger.info("no %s on this host; libraries are found by directory search only",
                    HOST_CACHE)
    except (OSError, ldcache.LdCacheError) as e:
        raise PackError(f"cannot read the host's {HOST_CACHE}: {e}") from None
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
