#!/usr/bin/env python3
"""rpack against the manual pipeline it replaces, measured in one run: medians, ratios, memory.

Run as root (the manual pipeline needs chroot), from the checkout's venv:

    .venv/bin/python tests/benchmark.py [--runs N] [--memory-mib N] [--work DIR]

Each case runs rpack and its reference alternately, `--runs` times each after one warm-up of
both (so both read from a warm page cache), and prints the median wall time of each and their
ratio, with the target the ratio should meet. Peak RSS is the largest resident set of the
command and every process it waited for (wait4), in MiB. The machine is shared and noisy: the
ratios, taken in the same run, are the figures to read, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from packer.elf import read_dynamic  # noqa: E402
from packer.errors import PackError  # noqa: E402

RPACK = [sys.executable, "-m", "rpack"]
MiB = 1 << 20
# Several large programs whose closure, with the standard libraries rpack adds, is over 200 MB.
LARGE = ["/usr/bin/gdb", "/usr/bin/cmake", "/usr/bin/ctest", "/usr/bin/python3", "/usr/bin/perl",
         "/usr/bin/git", "/usr/bin/perf", "/usr/lib/gcc/x86_64-linux-gnu/12/cc1"]


@dataclass
class Case:
    name: str
    ours: float
    reference: float
    target: float | None
    peak_kib: int

    @property
    def ratio(self) -> float:
        return self.ours / self.reference


Command = Sequence[str | Path] | str


def measure(command: Command) -> tuple[float, int]:
    """The wall time of one command and its peak RSS in KiB; exits on failure."""
    shell = isinstance(command, str)
    args = command if isinstance(command, str) else [str(arg) for arg in command]
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(args, shell=shell, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errors,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            errors.seek(0)
            sys.exit(f"benchmark: {args} exited {proc.returncode}:\n"
                     + errors.read().decode(errors="replace"))
    return elapsed, usage.ru_maxrss


def compare(name: str, ours: Command, reference: Command, runs: int, target: float | None,
            before: Callable[[], None] = lambda: None) -> Case:
    """Run `ours` and `reference` alternately; `before` runs, untimed, before each command."""
    times: tuple[list[float], list[float]] = ([], [])
    peak = 0
    for run in range(runs + 1):
        for index, command in enumerate((ours, reference)):
            before()
            elapsed, rss = measure(command)
            if run:  # the first round warms the page cache and is not counted
                times[index].append(elapsed)
            if index == 0:
                peak = max(peak, rss)
    case = Case(name, statistics.median(times[0]), statistics.median(times[1]), target, peak)
    report(case)
    return case


def report(case: Case) -> None:
    verdict = ""
    if case.target is not None:
        verdict = f"<= {case.target:<4} {'met' if case.ratio <= case.target else 'MISSED'}"
    print(f"{case.name:<44} {case.ours:8.3f} s {case.reference:8.3f} s {case.ratio:7.2f}  "
          f"{verdict:<12} {case.peak_kib / 1024:7.1f}", flush=True)


def repeated_runs(run: list[str | Path], clean: list[str | Path], archive: Path,
                  runs: int) -> None:
    """The first run of an archive, which unpacks it into the cache, and the second, which
    finds it there: the second should take at most 0.3 of the first."""
    first, second, peak = [], [], 0
    for _ in range(runs):
        measure(clean)
        for times in (first, second):
            elapsed, rss = measure([*run, archive, "--version"])
            times.append(elapsed)
            peak = max(peak, rss)
    report(Case(f"run {archive.stem.removesuffix('.tar')}: second run vs first (cache)",
                statistics.median(second), statistics.median(first), 0.3, peak))


def removed(*paths: Path) -> Callable[[], None]:
    def remove() -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
    return remove


def packed_sources(archive_programs: Sequence[str], *extra: str) -> list[str]:
    """The host files `rpack create` packs for these programs: what the reference tars."""
    done = subprocess.run([*RPACK, "deps", "--json", *extra, *archive_programs],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    files = json.loads(done.stdout)["files"]
    return sorted({f["source"].lstrip("/") for f in files if f["source"]})


def manual_create(programs: Sequence[str], sources: list[str], listing: Path,
                  out: Path) -> str:
    """ldd each program, then tar the files with symlinks followed through zstd on all cores."""
    listing.write_text("\n".join(sources) + "\n")
    ldd = "; ".join(f"ldd {program} > /dev/null" for program in programs)
    return f"{ldd}; tar -C / -ch -T {listing} | zstd -T0 -3 -q -f -o {out}"


def manual_run(archive: Path, root: Path, command: str) -> str:
    """What rpack run replaces: unpack, chroot, remove."""
    return (f"mkdir {root} && tar --zstd -xf {archive} -C {root} && chroot {root} {command}"
            f" > /dev/null; status=$?; rm -rf {root}; exit $status")


def dynamic_programs(directory: str) -> list[str]:
    """Every dynamically linked program in `directory`, by its real path, once."""
    programs = set()
    for name in sorted(os.listdir(directory)):
        path = os.path.realpath(os.path.join(directory, name))
        if not os.path.isfile(path) or os.path.dirname(path) != directory:
            continue
        try:
            if read_dynamic(path).interp is not None:
                programs.add(path)
        except PackError:
            continue
    return sorted(programs)


def make_data(where: Path, mib: int) -> None:
    """`mib` MiB of incompressible data: an eighth in 8 KiB files, the rest in large ones."""
    small = where / "small"
    small.mkdir(parents=True)
    for index in range(mib * 128 // 8):
        (small / f"f{index:06d}").write_bytes(os.urandom(8 << 10))
    left = mib - mib // 8
    index = 0
    while left > 0:
        size = min(left, 256)
        with open(where / f"large{index}", "wb") as f:
            for _ in range(size):
                f.write(os.urandom(MiB))
        left -= size
        index += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (default 5)")
    parser.add_argument("--memory-mib", type=int, default=1152,
                        help="size of the archive for the memory cases (default 1152 MiB)")
    parser.add_argument("--work", type=Path, help="where to put the inputs (default: a new "
                        "directory under /var/tmp, removed afterwards)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmark: run it as root: the manual pipeline needs chroot")
    work = args.work or Path(tempfile.mkdtemp(prefix="rpack-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run_cases(work, args.runs, args.memory_mib)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def run_cases(work: Path, runs: int, memory_mib: int) -> None:
    version = subprocess.run(["zstd", "--version"], capture_output=True, text=True).stdout
    zstd = "zstd " + next((w.rstrip(",") for w in version.split() if w.startswith("v")), "?")
    print(f"# {platform.node()}: {os.cpu_count()} cores, Linux {platform.release()}, "
          f"Python {platform.python_version()}, {zstd}; {runs} runs each, medians")
    print(f"{'case':<44} {'rpack':>10} {'reference':>10} {'ratio':>7}  {'target':<12} "
          f"{'rpack peak RSS MiB':>7}")
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    rpack = [*RPACK]

    # create: one program, then several large ones.
    gdb, large = work / "gdb.tar.zst", work / "large.tar.zst"
    compare("create gdb", [*rpack, "create", "-f", gdb, "/usr/bin/gdb"],
            manual_create(["/usr/bin/gdb"], packed_sources(["/usr/bin/gdb"]),
                          work / "gdb.list", work / "gdb-manual.tar.zst"), runs, 1.0)
    size = sum(os.path.getsize(os.path.join("/", s)) for s in packed_sources(LARGE))
    compare(f"create {len(LARGE)} large programs ({size / MiB:.0f} MiB)",
            [*rpack, "create", "-f", large, *LARGE],
            manual_create(LARGE, packed_sources(LARGE), work / "large.list",
                          work / "large-manual.tar.zst"), runs, 1.0)

    # extract: the same archive both ways, into a new directory.
    out = work / "out"
    for archive in (gdb, large):
        compare(f"extract {archive.name}", [*rpack, "extract", archive, out],
                f"mkdir {out} && tar --zstd -xf {archive} -C {out}", runs, 1.2, removed(out))

    # run: unpack, run, remove, without and with the cache of unpacked roots.
    sh = work / "sh.tar.zst"
    measure([*rpack, "create", "-f", sh, "/bin/sh"])
    root = work / "root"
    base = [*rpack, "run", "--tmpdir", tmp]
    for archive, program, command, target in (
            (sh, "sh -c true", "/bin/sh -c true", 1.5),
            (gdb, "gdb --version", "/usr/bin/gdb --version", 1.2)):
        args = command.split()[1:]
        compare(f"run {program}, --no-cache", [*base, "--no-cache", archive, *args],
                manual_run(archive, root, command), runs, target)
        compare(f"run {program}, cached root", [*base, archive, *args],
                manual_run(archive, root, command), runs, target)
    repeated_runs(base, [*rpack, "cache", "clean", "--tmpdir", tmp], gdb, runs)

    # deps: every dynamically linked program of /usr/bin, against ldd of each.
    programs = dynamic_programs("/usr/bin")
    listing = work / "programs"
    listing.write_text("\n".join(programs) + "\n")
    compare(f"deps of {len(programs)} programs in /usr/bin (one call)",
            f"xargs -a {listing} {' '.join(rpack)} deps --allow-missing > /dev/null",
            f"xargs -a {listing} -n 1 ldd > /dev/null 2>&1; true", runs, 0.5)
    sample = programs[:: max(1, len(programs) // 20)][:20]
    compare(f"deps of {len(sample)} programs, one call each",
            "; ".join(f"{' '.join(rpack)} deps --allow-missing {p} > /dev/null" for p in sample),
            "; ".join(f"ldd {p} > /dev/null 2>&1" for p in sample), runs, None)

    # memory: an archive of more than a GiB, created, extracted and run.
    data = work / "data"
    make_data(data, memory_mib)
    big = work / "big.tar.zst"
    memory_runs = max(1, runs // 2)
    compare(f"create {memory_mib} MiB (memory)", [*rpack, "create", "-f", big, "--add", data,
                                               "/bin/sh"],
            manual_create(["/bin/sh"], packed_sources(["/bin/sh"], "--add", str(data)),
                          work / "big.list", work / "big-manual.tar.zst"), memory_runs, 1.0)
    compare(f"extract {memory_mib} MiB (memory)", [*rpack, "extract", big, out],
            f"mkdir {out} && tar --zstd -xf {big} -C {out}", memory_runs, 1.2, removed(out))
    compare(f"run {memory_mib} MiB, --no-cache (memory)",
            [*base, "--no-cache", big, "-c", "true"],
            manual_run(big, root, "/bin/sh -c true"), memory_runs, 1.2)
    print("# peak RSS target: under 150 MiB for every rpack command above")


if __name__ == "__main__":
    sys.exit(main())
