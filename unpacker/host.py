"""Whether this host can run an archive's programs: machine, ELF class, byte order, kernel."""

import logging
import os
import re
import struct
import sys
from dataclasses import dataclass

from unpacker.errors import UnpackError
from unpacker.manifest import Platform

logger = logging.getLogger(__name__)

# Other `uname -m` spellings of the machines the packer names (packer/elf.py MACHINES).
_ALIASES = {"i386": "i686", "i486": "i686", "i586": "i686", "armv8l": "armv7l"}
_VERSION = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class Host:
    """The platform programs run on here.

    `machine` is `uname -m`, `elf_class` and `endian` those of the running interpreter,
    `kernel` the release (`uname -r`).
    """

    machine: str
    elf_class: int
    endian: str
    kernel: str

    @classmethod
    def this(cls) -> "Host":
        uname = os.uname()
        # The running interpreter is a native program: its pointer size is its ELF class.
        return cls(uname.machine, struct.calcsize("P") * 8, sys.byteorder, uname.release)


def check_platform(platform: Platform, host: Host | None = None) -> None:
    """Refuse an archive whose programs cannot run on `host` (this one by default).

    The message names both sides: the archive's machine, ELF class and byte order against the
    host's, or the archive's minimum kernel against the running one.
    """
    host = host or Host.this()
    wanted = f"{platform.machine} ({platform.elf_class}-bit, {platform.endian}-endian)"
    here = f"{host.machine} ({host.elf_class}-bit, {host.endian}-endian)"
    same_machine = _ALIASES.get(platform.machine, platform.machine) == _ALIASES.get(
        host.machine, host.machine)
    if not same_machine or (platform.elf_class, platform.endian) != (host.elf_class, host.endian):
        raise UnpackError(f"archive is for {wanted}, this host is {here}")

    if platform.min_kernel is None:
        return
    running = _version(host.kernel)
    if running is None:
        logger.warning("cannot tell the kernel version from %r; not checking that it is at "
                       "least %s", host.kernel, platform.min_kernel)
        return
    needed = _version(platform.min_kernel) or ()
    if _padded(running) < _padded(needed):
        raise UnpackError(f"archive needs linux {platform.min_kernel} or later, this host runs "
                          f"{host.kernel}")


def _version(text: str) -> tuple[int, ...] | None:
    """The leading dotted number of a version or kernel release: "6.1.0-28-amd64" -> (6, 1, 0)."""
    match = _VERSION.match(text)
    return tuple(int(part) for part in match[0].split(".")) if match else None


def _padded(version: tuple[int, ...]) -> tuple[int, ...]:
    return (version + (0, 0, 0))[:max(3, len(version))]
