"""ELF files as the loader sees them: the header checks it makes, the dynamic section it reads."""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from enum import Enum
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.construct.core import ConstructError
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerDefSection

from .errors import PackError

ET_EXEC, ET_DYN = 2, 3

# What pyelftools raises on a file it cannot parse: its own errors, construct's and whatever a
# bad offset or count makes Python raise while it follows them.
PARSE_ERRORS = (ELFError, ConstructError, ValueError, struct.error, IndexError, KeyError,
                OverflowError, OSError)
DF_1_NODEFLIB = 0x800
DF_1_PIE = 0x08000000

# e_machine numbers and their `uname -m` spelling, for the machines rpack knows by name.
MACHINES = {3: "i686", 62: "x86_64", 183: "aarch64", 40: "armv7l", 21: "ppc64le",
            22: "s390x", 243: "riscv64"}

# The OS ABIs the glibc loader accepts (VALID_ELF_OSABI): SYSV and GNU/Linux.
OSABI_SYSV, OSABI_GNU = 0, 3
# LIBC_ABI_MAX of glibc 2.36 on x86_64: OSABI GNU objects may carry ABI versions below it.
LIBC_ABI_MAX = 4


@dataclass(frozen=True)
class Header:
    """The ELF identification and the few header fields the loader checks."""

    elf_class: int      # 32 or 64
    little_endian: bool
    osabi: int
    e_type: int
    machine: int

    @property
    def machine_name(self) -> str:
        return MACHINES.get(self.machine, f"e_machine {self.machine}")


class Verdict(Enum):
    """What the glibc loader does with a candidate file (loader.md R44-R47)."""

    OK = "ok"
    ABSENT = "absent"       # ENOENT or EACCES: try the next candidate
    SKIP = "skip"           # another ELF class or machine: skipped silently
    FATAL = "fatal"         # the whole program fails to start


@dataclass(frozen=True)
class Check:
    verdict: Verdict
    reason: str = ""


def read_header(path: str) -> Header:
    """Read the ELF header of `path`, raising PackError if it is not an ELF file."""
    try:
        with open(path, "rb") as f:
            data = f.read(64)
    except OSError as e:
        raise PackError(f"cannot read {path!r}: {e.strerror}") from None
    header = parse_header(data)
    if header is None:
        raise PackError(f"{path!r} is not an ELF file")
    return header


def parse_header(data: bytes) -> Header | None:
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return None
    order = "<" if data[5] == 1 else ">"
    e_type, machine = struct.unpack_from(order + "HH", data, 16)
    return Header(32 if data[4] == 1 else 64, data[5] == 1, data[7], e_type, machine)


def check_candidate(path: str, elf_class: int, machine: int) -> Check:
    """Decide as glibc's open_verify does whether a library candidate is used, skipped or fatal."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR, errno.ENAMETOOLONG):
            return Check(Verdict.ABSENT)
        return Check(Verdict.FATAL, f"cannot open shared object file: {e.strerror}")
    try:
        data = os.read(fd, 64)
    except OSError as e:
        return Check(Verdict.FATAL, f"cannot read file data: {e.strerror}")
    finally:
        os.close(fd)
    ehdr_size = 64 if elf_class == 64 else 52
    if len(data) < ehdr_size:
        return Check(Verdict.FATAL, "file too short")
    if data[:4] != b"\x7fELF":
        return Check(Verdict.FATAL, "invalid ELF header")
    if data[4] != (2 if elf_class == 64 else 1):
        return Check(Verdict.SKIP, f"wrong ELF class: ELFCLASS{32 if data[4] == 1 else 64}")
    little = struct.unpack("=H", b"\x01\x00")[0] == 1
    if data[5] != (1 if little else 2):
        return Check(Verdict.FATAL, "ELF file data encoding not "
                     + ("little-endian" if little else "big-endian"))
    if data[6] != 1:
        return Check(Verdict.FATAL, "ELF file version ident does not match current one")
    osabi, abiversion = data[7], data[8]
    if osabi not in (OSABI_SYSV, OSABI_GNU):
        return Check(Verdict.FATAL, "ELF file OS ABI invalid")
    if abiversion != 0 and not (osabi == OSABI_GNU and abiversion < LIBC_ABI_MAX):
        return Check(Verdict.FATAL, "ELF file ABI version invalid")
    if any(data[9:16]):
        return Check(Verdict.FATAL, "nonzero padding in e_ident")
    order = "<" if little else ">"
    e_type, e_machine, e_version = struct.unpack_from(order + "HHI", data, 16)
    if e_version != 1:
        return Check(Verdict.FATAL, "ELF file version does not match current one")
    if e_machine != machine:
        return Check(Verdict.SKIP, f"machine {e_machine} is not {machine}")
    if e_type not in (ET_DYN, ET_EXEC):
        return Check(Verdict.FATAL, "only ET_DYN and ET_EXEC can be loaded")
    phentsize = struct.unpack_from(order + "H", data, 54 if elf_class == 64 else 42)[0]
    if phentsize != (56 if elf_class == 64 else 32):
        return Check(Verdict.FATAL, "ELF file's phentsize not the expected size")
    return Check(Verdict.OK)


@dataclass(frozen=True)
class Dynamic:
    """What the loader reads of one object: its header, PT_INTERP and dynamic section."""

    header: Header
    interp: str | None
    needed: tuple[str, ...]
    soname: str | None
    rpath: str | None           # DT_RPATH, already None when DT_RUNPATH is present
    runpath: str | None
    nodeflib: bool
    pie: bool

    @property
    def static(self) -> bool:
        return self.interp is None


PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 14, 15, 29
DT_FLAGS_1 = 0x6FFFFFFB
PN_XNUM = 0xFFFF


def read_dynamic(path: str) -> Dynamic:
    """Read what the loader reads of `path`: PT_INTERP and the dynamic section's strings.

    Only the program headers, the dynamic segment and its string table are read (pyelftools'
    generic parsing costs milliseconds an object, which adds up over hundreds of programs).
    """
    try:
        with open(path, "rb") as f:
            return _read_dynamic(f)
    except OSError as e:
        raise PackError(f"cannot read {path!r}: {e.strerror}") from None
    except _Malformed as e:
        raise PackError(f"{path!r}: malformed ELF file ({e})") from None


class _Malformed(Exception):
    pass


@dataclass(frozen=True)
class _Image:
    """The parts of an ELF file that the loader reads: header, PT_INTERP, dynamic tags, and
    the dynamic string table (DT_STRTAB, which is .dynstr)."""

    header: Header
    interp: str | None
    tags: list[tuple[int, int]]
    strings: bytes


def _read_dynamic(f: BinaryIO) -> Dynamic:
    image = _read_image(f)
    values = dict(image.tags)

    def text(tag: int) -> str | None:
        return _string(image.strings, values[tag]) if tag in values else None

    needed = tuple(_string(image.strings, value) for tag, value in image.tags
                   if tag == DT_NEEDED)
    runpath = text(DT_RUNPATH)
    flags_1 = values.get(DT_FLAGS_1, 0)
    # glibc drops DT_RPATH of an object that also has DT_RUNPATH (get-dynamic-info.h).
    rpath = None if runpath is not None else text(DT_RPATH)
    return Dynamic(image.header, image.interp, needed, text(DT_SONAME), rpath, runpath,
                   bool(flags_1 & DF_1_NODEFLIB), bool(flags_1 & DF_1_PIE))


def _read_image(f: BinaryIO) -> _Image:
    ident = f.read(64)
    header = parse_header(ident)
    if header is None:
        raise _Malformed("no ELF header")
    end = os.fstat(f.fileno()).st_size
    order = "<" if header.little_endian else ">"
    wide = header.elf_class == 64
    if wide:
        phoff, shoff = struct.unpack_from(order + "QQ", ident, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", ident, 54)
        phdr, dyn = order + "IIQQQQQQ", order + "qQ"
    else:
        phoff, shoff = struct.unpack_from(order + "II", ident, 28)
        phentsize, phnum = struct.unpack_from(order + "HH", ident, 42)
        phdr, dyn = order + "IIIIIIII", order + "iI"
    if phnum == PN_XNUM:
        # The real count lives in sh_info of section header 0.
        phnum = struct.unpack(order + "I", _read_at(f, end, shoff + (44 if wide else 28), 4,
                                                  "section header 0"))[0]
    if phentsize < struct.calcsize(phdr) and phnum:
        raise _Malformed(f"e_phentsize {phentsize} is smaller than a program header")
    table = _read_at(f, end, phoff, phentsize * phnum, "the program headers")
    loads: list[tuple[int, int, int]] = []
    interp = dynamic = None
    for i in range(phnum):
        fields = struct.unpack_from(phdr, table, i * phentsize)
        if wide:
            p_type, _, p_offset, p_vaddr, _, p_filesz = fields[:6]
        else:
            p_type, p_offset, p_vaddr, _, p_filesz = fields[:5]
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_INTERP and interp is None:
            interp = _string(_read_at(f, end, p_offset, p_filesz, "PT_INTERP"), 0)
        elif p_type == PT_DYNAMIC and dynamic is None:
            dynamic = _read_at(f, end, p_offset, p_filesz, "PT_DYNAMIC")
    tags: list[tuple[int, int]] = []
    for offset in range(0, len(dynamic or b"") - struct.calcsize(dyn) + 1, struct.calcsize(dyn)):
        tag, value = struct.unpack_from(dyn, dynamic or b"", offset)
        if tag == DT_NULL:
            break
        tags.append((tag, value))
    values = dict(tags)
    strings = b""
    if DT_STRTAB in values:
        strings = _read_at(f, end, _file_offset(loads, values[DT_STRTAB]),
                           values.get(DT_STRSZ, 0), "DT_STRTAB")
    return _Image(header, interp, tags, strings)


def _read_at(f: BinaryIO, end: int, offset: int, size: int, what: str) -> bytes:
    """Read `what` from the file of `end` bytes, refusing one that lies outside the file."""
    if offset > end or size > end - offset:
        raise _Malformed(f"{what} beyond the end of the file")
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise _Malformed(f"{what} beyond the end of the file")
    return data


def _file_offset(loads: list[tuple[int, int, int]], address: int) -> int:
    for vaddr, offset, filesz in loads:
        if vaddr <= address < vaddr + filesz:
            return address - vaddr + offset
    raise _Malformed(f"DT_STRTAB address {address:#x} is in no loaded segment")


def _string(table: bytes, offset: int) -> str:
    end = table.find(b"\0", offset)
    if offset >= len(table) or end < 0:
        raise _Malformed(f"string offset {offset} out of its table")
    return table[offset:end].decode("utf-8", "surrogateescape")


def abi_note(path: str) -> str | None:
    """The minimum kernel version from an object's NT_GNU_ABI_TAG note, e.g. "3.2.0"."""
    try:
        with open(path, "rb") as f:
            for segment in ELFFile(f).iter_segments():
                if segment["p_type"] != "PT_NOTE":
                    continue
                for note in segment.iter_notes():  # type: ignore[attr-defined]
                    if note["n_type"] == "NT_GNU_ABI_TAG":
                        desc = note["n_desc"]
                        return f"{desc['abi_major']}.{desc['abi_minor']}.{desc['abi_tiny']}"
    except PARSE_ERRORS:
        return None
    return None


def glibc_version(path: str) -> str | None:
    """The newest GLIBC_x.y version that a libc.so.6 defines, e.g. "2.36"."""
    best: tuple[int, ...] = ()
    try:
        with open(path, "rb") as f:
            for section in ELFFile(f).iter_sections():
                if not isinstance(section, GNUVerDefSection):
                    continue
                for _verdef, auxiliaries in section.iter_versions():
                    for aux in auxiliaries:
                        name = aux.name
                        if name.startswith("GLIBC_") and name[6:].replace(".", "").isdigit():
                            best = max(best, tuple(int(p) for p in name[6:].split(".")))
    except PARSE_ERRORS:
        return None
    return ".".join(map(str, best)) if best else None


NT_FDO_DLOPEN = 0x407C0C0A     # .note.dlopen: the libraries an object dlopens, as JSON


def dynstr_names(path: str) -> set[bytes]:
    """Every name in the object's dynamic string table (.dynstr): a cheap test of imports."""
    try:
        with open(path, "rb") as f:
            strings = _read_image(f).strings
    except (OSError, _Malformed, struct.error):
        return set()
    return set(strings.split(b"\0")) if strings else set()


def dlopen_notes(path: str) -> list[bytes]:
    """The JSON texts of the FDO .note.dlopen notes of an object (systemd's convention)."""
    texts = []
    try:
        with open(path, "rb") as f:
            header = parse_header(f.read(64))
            if header is None:
                return []
            order = "<" if header.little_endian else ">"
            for data in _sections(f, header, b".note.dlopen"):
                texts += _fdo_notes(data, order)
    except (OSError, _Malformed, struct.error):
        return []
    return texts


SHN_XINDEX, SHT_NOBITS = 0xFFFF, 8


def _sections(f: BinaryIO, header: Header, wanted: bytes) -> list[bytes]:
    """The contents of each section named `wanted`, found through the section headers."""
    end = os.fstat(f.fileno()).st_size
    order = "<" if header.little_endian else ">"
    ident = _read_at(f, end, 0, 64 if header.elf_class == 64 else 52, "the ELF header")
    if header.elf_class == 64:
        shoff, = struct.unpack_from(order + "Q", ident, 40)
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", ident, 58)
        shdr = order + "IIQQQQIIQQ"
    else:
        shoff, = struct.unpack_from(order + "I", ident, 32)
        shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", ident, 46)
        shdr = order + "IIIIIIIIII"
    if shoff == 0 or shentsize < struct.calcsize(shdr):
        return []
    if shnum == 0 or shstrndx == SHN_XINDEX:
        # Larger counts and indexes live in section header 0: sh_size and sh_link.
        first = struct.unpack_from(shdr, _read_at(f, end, shoff, shentsize, "section header 0"))
        shnum = shnum or first[5]
        shstrndx = first[6] if shstrndx == SHN_XINDEX else shstrndx
    table = _read_at(f, end, shoff, shnum * shentsize, "the section headers")
    # sh_name, sh_type, sh_offset, sh_size of each section
    sections = [(fields[0], fields[1], fields[4], fields[5])
                for fields in (struct.unpack_from(shdr, table, i * shentsize)
                               for i in range(shnum))]
    if shstrndx >= shnum:
        return []
    _, _, names_at, names_size = sections[shstrndx]
    names = _read_at(f, end, names_at, names_size, "the section names")
    found = []
    for name_at, kind, offset, size in sections:
        stop = names.find(b"\0", name_at)
        name = names[name_at:stop] if 0 <= name_at < len(names) and stop >= 0 else b""
        if name == wanted and kind != SHT_NOBITS:
            found.append(_read_at(f, end, offset, size, "a section"))
    return found


def _fdo_notes(data: bytes, order: str) -> list[bytes]:
    texts, offset = [], 0
    while offset + 12 <= len(data):
        namesz, descsz, n_type = struct.unpack_from(order + "III", data, offset)
        name_at = offset + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        if n_type == NT_FDO_DLOPEN and data[name_at:name_at + namesz].rstrip(b"\0") == b"FDO":
            texts.append(data[desc_at:desc_at + descsz].rstrip(b"\0"))
        offset = desc_at + (descsz + 3) // 4 * 4
    return texts
