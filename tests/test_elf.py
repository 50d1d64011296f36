"""packer.elf reads what pyelftools reads, for every ELF object of the host it is shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile

from packer.elf import read_dynamic
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


@pytest.mark.parametrize("cut", [10, 60, 200, 4000])
def test_truncated_objects_are_one_error(tmp_path: Path, cut: int) -> None:
    broken = tmp_path / "broken"
    broken.write_bytes(Path("/bin/sh").resolve().read_bytes()[:cut])
    with pytest.raises(PackError, match="broken"):
        read_dynamic(str(broken))
