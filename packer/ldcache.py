"""Read, query and write glibc's /etc/ld.so.cache (loader.md 7.1-7.3 and Appendix B)."""

import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cmp_to_key
from typing import Literal

NEW_MAGIC = b"glibc-ld.so.cache1.1"      # magic and version of the new format
OLD_MAGIC = b"ld.so-1.7.0"
EXTENSION_MAGIC = 0xEAA42174
TAG_GENERATOR = 0
TAG_GLIBC_HWCAPS = 1
HWCAP_EXTENSION = 1 << 62               # DL_CACHE_HWCAP_EXTENSION
ISA_LEVEL_MASK = 0x3FF << 32            # x86 ISA-level bits beside the extension bit

_HEADER = "20sIIB3xI12x"                # 48 bytes: magic, nlibs, len_strings, flags, ext offset
_ENTRY = "iIIIQ"                        # 24 bytes: flags, key, value, osversion, hwcap
_OLD_ENTRY = "iII"                      # 12 bytes: flags, key, value
_HOST_ORDER = "<" if sys.byteorder == "little" else ">"

# _DL_CACHE_DEFAULT_ID per (uname -m of the object's machine, ELF class); absent means the
# generic rule (flags 1 or 3). XXX: armv7l assumes hard float (armel also accepts 0x0b03 and 3);
# riscv64 assumes the lp64d ABI; MIPS is left generic although n32/n64/nan2008 have their own.
_REQUIRED_FLAGS = {
    ("x86_64", 64): 0x0303, ("x86_64", 32): 0x0803, ("aarch64", 64): 0x0A03,
    ("ppc64", 64): 0x0503, ("ppc64le", 64): 0x0503, ("s390x", 64): 0x0403,
    ("sparc64", 64): 0x0103, ("ia64", 64): 0x0203, ("riscv64", 64): 0x1003,
    ("armv7l", 32): 0x0903, ("armv8l", 32): 0x0903,
}


class LdCacheError(ValueError):
    """An ld.so.cache image that is truncated, has a bad magic or points outside itself."""


@dataclass(frozen=True)
class CacheEntry:
    """One cache row: which path the loader maps for a SONAME, and under which conditions."""

    key: str                    # the SONAME (or file name)
    value: str                  # the path, e.g. "/lib/x86_64-linux-gnu/libz.so.1"
    flags: int                  # e.g. 0x0303 (libc6, x86-64)
    hwcap: int                  # raw 64-bit hwcap field
    hwcaps_subdir: str | None   # glibc-hwcaps subdirectory ("x86-64-v3"), else None


def parse_cache(data: bytes) -> list[CacheEntry]:
    """Decode a cache image into its entries, in file order.

    New, old and compat files are accepted. For compat files the embedded new-format table is
    returned, since that is the one the loader and `ldconfig -p` use. Strings are decoded as
    UTF-8 with surrogateescape, so any byte sequence survives a round trip.
    """
    return _read(data)[0]


def parse_generator(data: bytes) -> str | None:
    """The generator string of a cache image ("ldconfig (Debian GLIBC ...)"), if it has one."""
    return _read(data)[1]


def required_flags(machine: str, elf_class: int) -> int | None:
    """The exact entry flags the loader for this machine and ELF class accepts (R52).

    `machine` is the `uname -m` spelling of the object's machine, so x86_64 with ELF class 32
    means x32. None means the generic rule: flags 1 (ELF) or 3 (libc6).
    """
    return _REQUIRED_FLAGS.get((machine, elf_class))


def flags_match(flags: int, required: int | None) -> bool:
    """_dl_cache_check_flags: equality with the required value, or 1/3 for the generic rule."""
    return flags in (1, 3) if required is None else flags == required


def libcmp(a: str, b: str) -> int:
    """glibc's _dl_cache_libcmp: digit runs compare as numbers, a digit beats a non-digit.

    Only the sign is meaningful. Bytes compare as signed chars and digit runs wrap at 32 bits,
    as the C code does on x86_64.
    """
    p, q = _encode(a) + b"\0", _encode(b) + b"\0"
    i = j = 0
    while p[i]:
        if _isdigit(p[i]):
            if not _isdigit(q[j]):
                return 1
            x, i = _number(p, i)
            y, j = _number(q, j)
            if x != y:
                return _int32(x - y)
        elif _isdigit(q[j]):
            return -1
        elif p[i] != q[j]:
            return _schar(p[i]) - _schar(q[j])
        else:
            i, j = i + 1, j + 1
    return -_schar(q[j])


def lookup(
    entries: list[CacheEntry], name: str, required: int | None, active_hwcaps: list[str]
) -> str | None:
    """The path glibc 2.36's search_cache returns for `name`, or None.

    The entries must be in file order: like the loader, this binary-searches the descending
    table and then walks the run of equal keys. glibc-hwcaps entries whose subdirectory is in
    `active_hwcaps` (best first) win by priority; otherwise the first plain entry whose flags
    match wins. XXX: legacy hwcap-bitmask entries count as plain only when hwcap == 0, so they
    are never chosen (glibc < 2.37 also takes them when the CPU has all their bits), and the
    x86 ISA-level bits of glibc-hwcaps entries are assumed compatible.
    """
    left, right = 0, len(entries) - 1
    while left <= right:
        middle = (left + right) // 2
        cmp = libcmp(name, entries[middle].key)
        if cmp == 0:
            while middle > 0 and libcmp(name, entries[middle - 1].key) == 0:
                middle -= 1
            return _choose(entries[middle : right + 1], name, required, active_hwcaps)
        if cmp < 0:
            left = middle + 1
        else:
            right = middle - 1
    return None


def build_cache(
    entries: Iterable[CacheEntry],
    generator: str | None = None,
    *,
    byteorder: Literal["little", "big"] = "little",
) -> bytes:
    """A new-format cache image holding `entries` (Appendix B); the same input gives the same bytes.

    Give the entries in directory-priority order: the sort is stable, so among equal keys the
    earlier entry stays first and wins lookups. The hwcap of glibc-hwcaps entries is rewritten
    to point into this file's subdirectory list (ISA-level bits are kept).
    """
    order = "<" if byteorder == "little" else ">"
    ordered = sorted(entries, key=cmp_to_key(_compare))
    subdirs = sorted({e.hwcaps_subdir for e in ordered if e.hwcaps_subdir is not None}, key=_encode)
    table_start = 48 + 24 * len(ordered)
    strings = [s for e in ordered for s in (e.key, e.value)] + subdirs
    table, offsets = _string_table(strings, table_start)

    body = bytearray()
    for e in ordered:
        body += struct.pack(order + _ENTRY, e.flags, offsets[e.key], offsets[e.value], 0,
                            _hwcap_field(e, subdirs))
    body += table

    # The extension directory lists the generator first and then the glibc-hwcaps array; the
    # data follows in the opposite order, as ldconfig 2.36 writes it.
    sections: list[tuple[int, bytes]] = []
    if subdirs:
        array = struct.pack(f"{order}{len(subdirs)}I", *(offsets[s] for s in subdirs))
        sections.append((TAG_GLIBC_HWCAPS, array))
    if generator is not None:
        sections.append((TAG_GENERATOR, _encode(generator)))
    ext_offset = 0
    if sections:
        body += bytes(-(48 + len(body)) % 4)
        ext_offset = 48 + len(body)
        body += _extension(sections, ext_offset, order)

    flags = 2 if byteorder == "little" else 3
    header = struct.pack(order + _HEADER, NEW_MAGIC, len(ordered), len(table), flags, ext_offset)
    return header + bytes(body)


def _read(data: bytes) -> tuple[list[CacheEntry], str | None]:
    if data.startswith(NEW_MAGIC):
        return _parse_new(data, 0)
    if not data.startswith(OLD_MAGIC):
        raise LdCacheError(f"bad magic {data[:20]!r}: not an ld.so.cache file")
    if len(data) < 16:
        raise LdCacheError(f"truncated cache: {len(data)} bytes, the old header needs 16")
    (nlibs,) = struct.unpack_from(_HOST_ORDER + "I", data, 12)
    if nlibs > (len(data) - 16) // 12:
        raise LdCacheError(f"truncated cache: the old header claims {nlibs} entries")

    # A compat file hides a new-format cache at the next 8-byte boundary after the old
    # entries; its string offsets count from there.
    base = 16 + 12 * nlibs
    new_base = base + (-base % 8)
    if data.startswith(NEW_MAGIC, new_base):
        return _parse_new(data, new_base)
    rows = struct.iter_unpack(_HOST_ORDER + _OLD_ENTRY, data[16:base])
    return [CacheEntry(_string(data, base, k), _string(data, base, v), f, 0, None)
            for f, k, v in rows], None


def _parse_new(data: bytes, base: int) -> tuple[list[CacheEntry], str | None]:
    if len(data) < base + 48:
        raise LdCacheError(f"truncated cache: {len(data)} bytes, the header ends at {base + 48}")
    endian = data[base + 28] & 3
    if endian == 1:
        raise LdCacheError("the cache header marks the file as invalid (endianness flag 1)")
    order = {0: _HOST_ORDER, 2: "<", 3: ">"}[endian]
    _, nlibs, _, _, ext_offset = struct.unpack_from(order + _HEADER, data, base)
    if nlibs > (len(data) - base - 48) // 24:
        raise LdCacheError(f"truncated cache: the header claims {nlibs} entries")

    sections = _read_extensions(data, ext_offset, order)
    subdirs = _read_hwcaps(data, sections.get(TAG_GLIBC_HWCAPS), order)
    entries = []
    for i in range(nlibs):
        flags, key, value, _, hwcap = struct.unpack_from(order + _ENTRY, data, base + 48 + 24 * i)
        subdir = None
        if _is_hwcaps(hwcap):
            index = hwcap & 0xFFFFFFFF
            if index >= len(subdirs):
                raise LdCacheError(f"entry {i}: glibc-hwcaps index {index} is out of range "
                                   f"({len(subdirs)} subdirectories)")
            subdir = subdirs[index]
        entries.append(CacheEntry(_string(data, base, key), _string(data, base, value),
                                  flags, hwcap, subdir))

    generator = None
    if TAG_GENERATOR in sections:
        offset, size = sections[TAG_GENERATOR]
        generator = data[offset : offset + size].decode("utf-8", "surrogateescape")
    return entries, generator


def _read_extensions(data: bytes, offset: int, order: str) -> dict[int, tuple[int, int]]:
    """Map each extension tag to its (file offset, size); the last section of a tag wins."""
    if offset == 0:
        return {}
    if offset % 4 or offset + 8 > len(data):
        raise LdCacheError(f"bad extension directory offset {offset:#x}")
    magic, count = struct.unpack_from(order + "II", data, offset)
    if magic != EXTENSION_MAGIC:
        raise LdCacheError(f"bad extension magic {magic:#x} at offset {offset:#x}")
    if offset + 8 + 16 * count > len(data):
        raise LdCacheError(f"truncated cache: the extension directory claims {count} sections")
    sections = {}
    for tag, _, start, size in struct.iter_unpack(order + "4I",
                                                  data[offset + 8 : offset + 8 + 16 * count]):
        if start + size > len(data):
            raise LdCacheError(f"extension section {tag} runs past the end of the file")
        sections[tag] = (start, size)
    return sections


def _read_hwcaps(data: bytes, section: tuple[int, int] | None, order: str) -> list[str]:
    # The loader and `ldconfig -p` read these offsets from the start of the file, while
    # ldconfig's compat writer stores them relative to the new-format header: do as readers do.
    if section is None:
        return []
    start, size = section
    if start % 4 or size % 4:
        raise LdCacheError("the glibc-hwcaps section is not 4-byte aligned")
    return [_string(data, 0, o) for o in struct.unpack_from(f"{order}{size // 4}I", data, start)]


def _string(data: bytes, base: int, offset: int) -> str:
    start = base + offset
    end = data.find(b"\0", start)
    if start >= len(data) or end < 0:
        raise LdCacheError(f"string offset {offset:#x} points past the end of the file")
    return data[start:end].decode("utf-8", "surrogateescape")


def _choose(
    run: list[CacheEntry], name: str, required: int | None, active_hwcaps: list[str]
) -> str | None:
    """Walk the entries from the first equal key on, as search_cache's inner loop does."""
    default = 3 if required is None else required
    best: str | None = None
    best_priority = 0
    for entry in run:
        if libcmp(name, entry.key) != 0:
            break
        if not flags_match(entry.flags, required):
            continue
        named = _is_hwcaps(entry.hwcap)
        if not named and best is not None:
            break       # glibc-hwcaps entries come first; a plain one ends the search
        if named:
            if entry.hwcaps_subdir not in active_hwcaps:
                continue
            priority = active_hwcaps.index(entry.hwcaps_subdir) + 1    # lower is better
            if best is not None and priority >= best_priority:
                continue
            best_priority = priority
        elif entry.hwcap != 0:
            continue
        best = entry.value
        if not named and entry.flags == default:
            break
    return best


def _compare(x: CacheEntry, y: CacheEntry) -> int:
    """ldconfig's order: descending libcmp key, then the tie-breakers of _tiebreak."""
    res = libcmp(y.key, x.key)
    if res:
        return res
    tx, ty = _tiebreak(x), _tiebreak(y)
    return (tx > ty) - (tx < ty)


def _tiebreak(e: CacheEntry) -> tuple[int, bool, bytes, int, int]:
    # Higher flags first; glibc-hwcaps entries before plain ones, by subdirectory name; then
    # legacy hwcap entries with more bits, then a higher mask.
    legacy = e.hwcap if e.hwcaps_subdir is None else 0
    subdir = _encode(e.hwcaps_subdir or "")
    return (-e.flags, e.hwcaps_subdir is None, subdir, -legacy.bit_count(), -legacy)


def _hwcap_field(e: CacheEntry, subdirs: list[str]) -> int:
    if e.hwcaps_subdir is not None:
        return (e.hwcap & ISA_LEVEL_MASK) | HWCAP_EXTENSION | subdirs.index(e.hwcaps_subdir)
    if _is_hwcaps(e.hwcap):
        raise LdCacheError(f"entry {e.key} has a glibc-hwcaps hwcap but no subdirectory")
    return e.hwcap


def _string_table(strings: Iterable[str], start: int) -> tuple[bytes, dict[str, int]]:
    """Lay out NUL-terminated strings at file offset `start`, sharing common tails.

    Sorting by reversed bytes, descending, puts each string right after a string it may be the
    tail of, so "libz.so.1" lands inside "/lib/x86_64-linux-gnu/libz.so.1".
    """
    encoded = {s: _encode(s) for s in set(strings)}
    table = bytearray()
    offsets: dict[str, int] = {}
    holder = b""
    holder_offset = -1
    for s, raw in sorted(encoded.items(), key=lambda item: item[1][::-1], reverse=True):
        if holder_offset >= 0 and holder.endswith(raw):
            offsets[s] = holder_offset + len(holder) - len(raw)
            continue
        holder, holder_offset = raw, start + len(table)
        offsets[s] = holder_offset
        table += raw + b"\0"
    return bytes(table), offsets


def _extension(sections: list[tuple[int, bytes]], offset: int, order: str) -> bytes:
    start = offset + 8 + 16 * len(sections)
    directory: list[bytes] = []
    payload = bytearray()
    for tag, blob in sections:
        directory.append(struct.pack(order + "4I", tag, 0, start + len(payload), len(blob)))
        payload += blob
    head = struct.pack(order + "II", EXTENSION_MAGIC, len(sections))
    return head + b"".join(reversed(directory)) + bytes(payload)


def _is_hwcaps(hwcap: int) -> bool:
    return (hwcap & ~ISA_LEVEL_MASK) >> 32 == HWCAP_EXTENSION >> 32


def _encode(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _isdigit(c: int) -> bool:
    return 0x30 <= c <= 0x39


def _number(s: bytes, i: int) -> tuple[int, int]:
    value = 0
    while _isdigit(s[i]):
        value = _int32(value * 10 + s[i] - 0x30)
        i += 1
    return value, i


def _int32(v: int) -> int:
    return (v + 2**31) % 2**32 - 2**31


def _schar(c: int) -> int:
    return c - 256 if c >= 128 else c
