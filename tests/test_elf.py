"""packer.elf reads what pyelftools reads, for every ELF object of the host it is shown."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import error_lines, rpack
from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packer.elf import (
    _fdo_notes,
    abi_note,
    dlopen_notes,
    dynstr_names,
    glibc_version,
    read_dynamic,
)
from packer.errors import PackError

DIRECTORIES = ["/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu", "/usr/lib/perf-core",
               "/usr/libexec/valgrind"]


def reference(path: str) -> tuple[object, ...]:
    """The same fields, read the slow general way."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        interp, needed, soname, rpath, runpath, flags_1 = None, [], None, None, None, 0
        for segment in elf.iter_segments():
            if segment["p_type"] == "PT_INTERP":
                interp = segment.get_interp_name()
            elif isinstance(segment, DynamicSegment):
                for tag in segment.iter_tags():
                    kind = tag.entry.d_tag
                    if kind == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif kind == "DT_SONAME":
                        soname = tag.soname
                    elif kind == "DT_RPATH":
                        rpath = tag.rpath
                    elif kind == "DT_RUNPATH":
                        runpath = tag.runpath
                    elif kind == "DT_FLAGS_1":
                        flags_1 = tag.entry.d_val
        return interp, tuple(needed), soname, None if runpath else rpath, runpath, flags_1


def host_objects() -> list[str]:
    found = []
    for directory in DIRECTORIES:
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    if f.read(4) == b"\x7fELF":
                        found.append(path)
    return found


@pytest.mark.heavy
def test_reads_what_pyelftools_reads_on_every_host_object() -> None:
    objects = host_objects()
    differences = []
    for path in objects:
        try:
            expected = reference(path)
        except (ELFError, ValueError):
            continue
        got = read_dynamic(path)
        flags = (0x800 if got.nodeflib else 0) | (0x08000000 if got.pie else 0)
        mine = (got.interp, got.needed, got.soname, got.rpath, got.runpath, flags)
        if mine[:5] != expected[:5] or flags != (expected[5] & 0x08000800):  # type: ignore[operator]
            differences.append(f"{path}: {mine} != {expected}")
    print(f"compared {len(objects)} ELF objects")
    assert len(objects) > 100
    assert differences == []


def sections_by_pyelftools(path: str) -> tuple[set[bytes], list[bytes]]:
    """.dynstr's names and the .note.dlopen texts, read the slow general way."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        dynstr = elf.get_section_by_name(".dynstr")
        names = set(dynstr.data().split(b"\0")) if dynstr is not None and dynstr.data() else set()
        order = "<" if elf.little_endian else ">"
        notes = [text for section in elf.iter_sections() if section.name == ".note.dlopen"
                 for text in _fdo_notes(section.data(), order)]
    return names, notes


@pytest.mark.heavy
def test_section_readers_read_what_pyelftools_reads_on_every_host_object() -> None:
    objects = host_objects()
    differences = []
    for path in objects:
        try:
            names, notes = sections_by_pyelftools(path)
        except (ELFError, ValueError):
            continue
        if dynstr_names(path) != names or dlopen_notes(path) != notes:
            differences.append(path)
    assert len(objects) > 100
    assert differences == []


@pytest.mark.parametrize("cut", [10, 60, 200, 4000])
def test_truncated_objects_are_one_error(tmp_path: Path, cut: int) -> None:
    broken = tmp_path / "broken"
    broken.write_bytes(Path("/bin/sh").resolve().read_bytes()[:cut])
    with pytest.raises(PackError, match="broken"):
        read_dynamic(str(broken))


LS = Path("/bin/ls").resolve().read_bytes()
PT_INTERP, PT_DYNAMIC = 3, 2
PHOFF = struct.unpack_from("<Q", LS, 32)[0]
PHNUM = struct.unpack_from("<H", LS, 56)[0]


def phdr_at(data: bytes, p_type: int) -> int:
    """The file offset of the first program header of `p_type` in a 64-bit object."""
    for i in range(PHNUM):
        at = PHOFF + 56 * i
        if struct.unpack_from("<I", data, at)[0] == p_type:
            return at
    raise AssertionError(f"no program header of type {p_type}")


def dynamic_entry(data: bytes, tag: int) -> int:
    """The file offset of the first dynamic entry with d_tag `tag`."""
    at = phdr_at(data, PT_DYNAMIC)
    offset = struct.unpack_from("<Q", data, at + 8)[0]
    size = struct.unpack_from("<Q", data, at + 32)[0]
    for entry in range(offset, offset + size, 16):
        if struct.unpack_from("<q", data, entry)[0] == tag:
            return entry
    raise AssertionError(f"no dynamic tag {tag}")


def put(data: bytearray, offset: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, data, offset, value)


CORRUPTIONS: dict[str, tuple[Callable[[bytearray], None], str]] = {
    "dynamic offset past 2**64": (
        lambda d: put(d, phdr_at(d, PT_DYNAMIC) + 8, "<Q", 2**64 - 16),
        r"PT_DYNAMIC beyond the end of the file"),
    "dynamic offset past 2**63": (
        lambda d: put(d, phdr_at(d, PT_DYNAMIC) + 8, "<Q", 2**63 - 1),
        r"PT_DYNAMIC beyond the end of the file"),
    "dynamic size past the end": (
        lambda d: put(d, phdr_at(d, PT_DYNAMIC) + 32, "<Q", 2**64 - 1),
        r"PT_DYNAMIC beyond the end of the file"),
    "interp offset past the end": (
        lambda d: put(d, phdr_at(d, PT_INTERP) + 8, "<Q", len(LS) + 1),
        r"PT_INTERP beyond the end of the file"),
    "program headers past the end": (
        lambda d: put(d, 32, "<Q", 2**64 - 8), r"the program headers beyond the end of the file"),
    "PN_XNUM with a section header past the end": (
        lambda d: (put(d, 56, "<H", 0xFFFF), put(d, 40, "<Q", 2**63))[0],
        r"section header 0 beyond the end of the file"),
    "tiny program headers": (
        lambda d: put(d, 54, "<H", 8), r"e_phentsize 8 is smaller than a program header"),
    "string table in no segment": (
        lambda d: put(d, dynamic_entry(d, 5) + 8, "<Q", 2**64 - 1),
        r"DT_STRTAB address 0xffffffffffffffff is in no loaded segment"),
    "string table size past the end": (
        lambda d: put(d, dynamic_entry(d, 10) + 8, "<Q", 2**62),
        r"DT_STRTAB beyond the end of the file"),
    "needed name out of its table": (
        lambda d: put(d, dynamic_entry(d, 1) + 8, "<Q", 2**40),
        r"string offset \d+ out of its table"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_headers_are_one_error_naming_the_cause(tmp_path: Path, case: str) -> None:
    corrupt, cause = CORRUPTIONS[case]
    data = bytearray(LS)
    corrupt(data)
    broken = tmp_path / "broken"
    broken.write_bytes(data)
    with pytest.raises(PackError, match=rf"^'{broken}': malformed ELF file \({cause}\)$"):
        read_dynamic(str(broken))


def test_a_malformed_program_is_one_error_line(tmp_path: Path) -> None:
    data = bytearray(LS)
    put(data, phdr_at(data, PT_DYNAMIC) + 8, "<Q", 2**64 - 16)
    (tmp_path / "baddyn").write_bytes(data)
    done = rpack("deps", "./baddyn", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert error_lines(done.stderr) == [
        f"rpack: error: '{tmp_path / 'baddyn'}': malformed ELF file "
        "(PT_DYNAMIC beyond the end of the file)"]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, PHOFF + 56 * PHNUM - 1),
                          st.binary(min_size=1, max_size=8)), min_size=1, max_size=6))
def test_mutated_headers_never_raise_anything_else(tmp_path: Path,
                                                   patches: list[tuple[int, bytes]]) -> None:
    data = bytearray(LS)
    for offset, chunk in patches:
        data[offset:offset + len(chunk)] = chunk
    broken = tmp_path / "mutated"
    broken.write_bytes(data)
    try:
        read_dynamic(str(broken))
    except PackError as e:
        assert str(e).startswith(f"'{broken}': ")
    # The section readers never fail a pack: a file they cannot parse has nothing to offer.
    abi_note(str(broken))
    glibc_version(str(broken))
    dynstr_names(str(broken))
    dlopen_notes(str(broken))
