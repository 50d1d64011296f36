"""From program paths to an archive: resolve every program, plan the root, write it."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from unpacker.format import DEFAULT_PATH, FORMAT
from unpacker.progress import bar

from . import ldcache, runtime, script
from .archive import Hashed, hash_sources, manifest_entries, write_archive
from .elf import ET_DYN, ET_EXEC, Verdict, abi_note, check_candidate, glibc_version, parse_header
from .errors import MissingLibraries, PackError
from .ldso import LoaderModel
from .plan import Member, Plan
from .resolve import LoadedObject, Missing, Resolution, Resolver
from .trace import TraceResult, run_trace

logger = logging.getLogger(__name__)

CACHE_PATH = "etc/ld.so.cache"


@dataclass
class Options:
    programs: list[str]
    adds: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    entrypoint: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    allow_missing: bool = False
    trace: bool = False
    trace_args: list[str] = field(default_factory=list)
    trace_excludes: list[str] = field(default_factory=list)
    trace_includes: list[str] = field(default_factory=list)


@dataclass
class Item:
    """One line of `rpack deps`: a file of the root and why it is there."""

    path: str
    source: str | None
    kind: str
    why: str


@dataclass
class Collection:
    """Everything `create` packs, before any byte is written."""

    programs: list[str]
    resolutions: list[Resolution]
    plan: Plan
    items: list[Item]
    missing: list[Missing]
    model: LoaderModel | None
    trace: TraceResult | None = None

    def report(self) -> dict[str, Any]:
        """The object `rpack deps --json` prints."""
        interps = [r.interp.name for r in self.resolutions if r.interp is not None]
        report: dict[str, Any] = {
            "programs": self.programs,
            "interpreter": interps[0] if interps else None,
            "files": [vars(item) for item in self.items],
            "missing": [{"name": m.name, "needed_by": m.needed_by} for m in self.missing],
        }
        if self.trace is not None:
            report["trace"] = self.trace.report()
        return report


def find_program(name: str, cwd: str) -> str:
    """The absolute path of a program named on the command line (PATH is searched for a name
    without a slash, as a shell would)."""
    if "/" not in name:
        found = shutil.which(name)
        if found is None:
            raise PackError(f"{name!r}: no such program in PATH")
        name = found
    path = os.path.abspath(os.path.join(cwd, name))
    if not os.path.lexists(path):
        raise PackError(f"{path!r}: no such file")
    _refuse_kernel_files(path, "as a program")
    return path


# Filesystems the kernel makes up as they are read; the archive holds /proc and /dev empty.
KERNEL_TREES = ("/proc", "/sys", "/dev")
MAX_HOPS = 40  # symlinks the kernel follows in one lookup


def _refuse_kernel_files(path: str, what: str) -> None:
    """Refuse a path in /proc, /sys or /dev, or one whose links lead there on any hop
    (/dev/stdin, a link to /proc/self/exe): packing it would pack the kernel's view of this
    process, and a new one each time."""
    hop = path
    for _ in range(MAX_HOPS):
        # The hop's directory resolved, so that a directory link on the way counts too.
        here = os.path.join(os.path.realpath(os.path.dirname(hop)), os.path.basename(hop))
        for candidate in (hop, here):
            tree = next((t for t in KERNEL_TREES
                         if candidate == t or candidate.startswith(t + "/")), None)
            if tree is not None:
                where = "is in" if hop == path else "leads into"
                raise PackError(f"{path!r} {where} {tree}, which the kernel provides, not a file "
                                f"to pack {what}", hint="name the file by its real path")
        if not os.path.islink(here):
            return
        hop = os.path.join(os.path.dirname(here), os.readlink(here))


def collect(options: Options, cwd: str | None = None) -> Collection:
    """Resolve every program and added file and plan the root, reading only ELF headers."""
    cwd = cwd or os.getcwd()
    resolver = Resolver(options.env, cwd)
    plan = Plan(options.excludes)
    items: dict[str, Item] = {}
    programs = [find_program(p, cwd) for p in options.programs]
    resolutions: list[Resolution] = []

    def note(path: str, source: str | None, kind: str, why: str) -> None:
        items.setdefault(path, Item(path, source, kind, why))

    for program in programs:
        if plan.add_program(program, "program"):
            note(program, os.path.realpath(program), "program", "named on the command line")
        for executable in _place_script(plan, program, options, note):
            resolution = resolver.resolve(executable)
            resolutions.append(resolution)
            _place_resolution(plan, resolution, note)
    starts = len(resolutions)
    for added in options.adds:
        path = os.path.abspath(os.path.join(cwd, added))
        if not os.path.lexists(path):
            raise PackError(f"{added!r}: no such file or directory (given to --add)")
        _refuse_kernel_files(path, "with --add")
        for member in plan.add_tree(path, "added"):
            note("/" + member, "/" + member, "added", f"under {path} (--add)")
            if plan.members[member].type == "symlink":
                continue
            module = _elf_module(resolver, "/" + member, resolutions)
            if module is not None:
                resolutions.append(module)
                _place_resolution(plan, module, note)
    traced = _place_traced(plan, resolver, options, programs, resolutions, note, cwd)
    loaded_later = _place_runtime(plan, resolver, resolutions, starts, note)
    missing = _missing(resolutions, module_count=len(resolutions) - starts)
    for dropped in sorted({d for r in resolutions for d in r.dropped}):
        logger.warning("DT_NEEDED %s is skipped by the loader: $ORIGIN is unknown", dropped)
    resolutions += loaded_later
    _check_defaults(plan, options, programs)
    model = next((r.model for r in resolutions if r.model is not None), None)
    if model is not None and model.libc == "glibc":
        data = _root_cache(plan, resolutions, model)
        plan.add_generated(CACHE_PATH, data, "generated")
        note("/" + CACHE_PATH, None, "generated", "ld.so.cache for exactly the packed libraries")
    elif model is not None and model.libc == "musl":
        _musl_path_file(plan, model, note)
    for directory, mode in (("proc", 0o555), ("dev", 0o755), ("tmp", 0o1777)):
        plan.add_generated_dir(directory, "generated", mode)
    if not plan.resolves(options.workdir, directory=True):
        raise PackError(f"--workdir {options.workdir!r} is not a directory in the archive",
                        hint="name a directory the archive holds, or add it with --add")
    if options.excludes:
        _check_excludes(plan, resolutions[:starts])
    collection = Collection(programs, resolutions, plan, list(items.values()), missing, model,
                            trace=traced)
    _check_missing(collection, options.allow_missing)
    return collection


def _place_resolution(plan: Plan, resolution: Resolution, note: Any) -> None:
    if resolution.interp is not None:
        interp = resolution.interp
        if plan.add_object(interp.name, interp.how):
            note(interp.name, os.path.realpath(interp.name), "interpreter", interp.how)
    for obj in resolution.libraries:
        needed_by = obj.loader.name if obj.loader else resolution.program
        if plan.add_object(_absolute(obj.name), f"needed by {needed_by}"):
            note(obj.name, os.path.realpath(obj.name), "library",
                 f"needed by {needed_by} ({obj.how})")
        for alias in obj.aliases:
            plan.add_object(_absolute(alias), f"another name of {obj.name}")
        for variant in _hwcaps_variants(obj, resolution.model):
            if plan.add_object(variant, f"glibc-hwcaps variant of {obj.name}"):
                note(variant, os.path.realpath(variant), "runtime",
                     f"the loader picks it instead of {obj.name} on other CPUs")


def _place_script(plan: Plan, program: str, options: Options, note: Any) -> list[str]:
    """The ELF programs to resolve for `program`: itself, or the interpreters of a script."""
    if not script.is_script(program):
        return [program]
    hops = script.interpreters(program, options.env.get("PATH", DEFAULT_PATH))
    for hop in hops:
        if plan.add_program(hop.path, "script-interpreter"):
            note(hop.path, os.path.realpath(hop.path), "script-interpreter", hop.why)
    return [hop.path for hop in hops if not script.is_script(hop.path)]


def _place_runtime(plan: Plan, resolver: Resolver, resolutions: list[Resolution], starts: int,
                   note: Any) -> list[Resolution]:
    """Place what the programs load at run time (packer/runtime.py); return the resolutions
    of the libraries among it, whose own missing libraries are only warned about."""
    model = next((r.model for r in resolutions if r.model is not None), None)
    objects = [obj for r in resolutions for obj in r.objects]
    added = plan.members.get(runtime.NSSWITCH_MEMBER)
    conf = added.source if added is not None and added.source else runtime.NSSWITCH
    extra = runtime.collect([r.program for r in resolutions[:starts]], objects, model, conf)

    def note_runtime(path: str, source: str | None, kind: str, why: str) -> None:
        note(path, source, "runtime" if kind == "library" else kind, why)

    loaded: list[Resolution] = []
    for module in extra.modules:
        if model is not None and plan.add_object(module.path, "runtime"):
            note(module.path, os.path.realpath(module.path), "runtime", module.why)
            loaded.append(resolver.resolve_module(module.path, model))
    for tree in extra.trees:
        for member in plan.add_tree(tree.path, "runtime"):
            note("/" + member, "/" + member, "runtime", tree.why)
            if plan.members[member].type == "symlink":
                continue
            elf = _elf_module(resolver, "/" + member, resolutions)
            if elf is not None:
                loaded.append(elf)
    for resolution in loaded:
        _place_resolution(plan, resolution, note_runtime)
        for m in resolution.missing:
            logger.warning("library %r needed by %s (loaded at run time) cannot be found",
                           m.name, m.needed_by)
        resolution.missing = []
    if extra.nsswitch is not None and added is None:
        plan.add_generated(runtime.NSSWITCH_MEMBER, extra.nsswitch, "generated")
        note("/" + runtime.NSSWITCH_MEMBER, None, "generated",
             "nsswitch.conf naming only the packed NSS services")
    return loaded


def _place_traced(plan: Plan, resolver: Resolver, options: Options, programs: list[str],
                  resolutions: list[Resolution], note: Any, cwd: str) -> TraceResult | None:
    """Run the entrypoint under strace (--trace) and place what it used like added files."""
    if not options.trace:
        return None
    entrypoint = options.entrypoint or programs[0]
    traced = run_trace([entrypoint, *options.trace_args], options.env, cwd,
                       options.trace_excludes, options.trace_includes, programs)
    for used in traced.files:
        if plan.excluded(used.path) or plan.resolves(used.path):
            continue
        if used.directory:
            plan.directory(used.path, "traced")
            note(used.path, used.path, "traced", used.why)
            continue
        if plan.add_program(used.path, "traced") is None:
            continue
        note(used.path, os.path.realpath(used.path), "traced", used.why)
        module = _elf_module(resolver, used.path, resolutions)
        if module is not None:
            resolutions.append(module)
            _place_resolution(plan, module, note)
    return traced


def _absolute(path: str) -> str:
    # XXX: a name the loader opened relative to the CWD is placed relative to the packing CWD.
    return path if path.startswith("/") else os.path.abspath(path)


def _hwcaps_variants(obj: LoadedObject, model: LoaderModel | None) -> list[str]:
    """Every glibc-hwcaps copy and the baseline of a library: the CPU at run time may differ."""
    if model is None or model.libc != "glibc" or not obj.name.startswith("/"):
        return []
    directory, name = os.path.split(obj.name)
    if os.path.basename(os.path.dirname(directory)) == "glibc-hwcaps":
        directory = os.path.dirname(os.path.dirname(directory))
    candidates = [os.path.join(directory, name)]
    hwcaps = os.path.join(directory, "glibc-hwcaps")
    if os.path.isdir(hwcaps):
        candidates += [os.path.join(hwcaps, sub, name) for sub in sorted(os.listdir(hwcaps))]
    return [c for c in candidates if c != obj.name and
            check_candidate(c, model.elf_class, model.machine).verdict is Verdict.OK]


def _elf_module(resolver: Resolver, path: str, resolutions: list[Resolution]) -> Resolution | None:
    """The resolution of an ELF file found in an added tree, or None for any other file."""
    try:
        with open(path, "rb") as f:
            header = parse_header(f.read(64))
    except OSError:
        return None
    model = next((r.model for r in resolutions if r.model is not None), None)
    if header is None or header.e_type not in (ET_DYN, ET_EXEC):
        return None
    dynamic, _ = resolver.read(path)
    if dynamic.interp is not None:
        return resolver.resolve(path)
    if model is None or (header.elf_class, header.machine) != (model.elf_class, model.machine):
        logger.debug("%s: not for the programs' loader, its libraries are not resolved", path)
        return None
    return resolver.resolve_module(path, model)


def _missing(resolutions: list[Resolution], module_count: int) -> list[Missing]:
    """Every library that cannot be found, once.

    XXX: the ELF files of added trees are loaded at run time by a process that has already
    mapped other objects; like the loader (R11), a name that a packed object answers to by
    its DT_SONAME counts as found for them, though no search would find it.
    """
    first_module = len(resolutions) - module_count
    provided = {name for r in resolutions for obj in r.objects for name in obj.names}
    provided |= {obj.dynamic.soname for r in resolutions for obj in r.objects
                 if obj.dynamic.soname}
    missing: dict[tuple[str, str], Missing] = {}
    for index, resolution in enumerate(resolutions):
        for m in resolution.missing:
            if index >= first_module and m.name in provided:
                logger.debug("%s: %s is provided by a packed object", m.needed_by, m.name)
                continue
            missing.setdefault((m.name, m.needed_by), m)
    return list(missing.values())


def _check_defaults(plan: Plan, options: Options, programs: list[str]) -> None:
    if not options.workdir.startswith("/"):
        raise PackError(f"--workdir {options.workdir!r} is not an absolute path")
    entrypoint = options.entrypoint or programs[0]
    if plan.resolves(entrypoint):
        return
    if entrypoint in programs:
        raise PackError(f"--exclude leaves out the entrypoint {entrypoint}",
                        hint="exclude less, or name another packed program with --entrypoint")
    raise PackError(f"--entrypoint {entrypoint!r} is not in the archive",
                    hint="name a packed program, or add it as a PROGRAM")


def _check_excludes(plan: Plan, resolutions: list[Resolution]) -> None:
    """Warn about every object the loader maps at start-up that an --exclude left out."""
    warned = set()
    for resolution in resolutions:
        needs = [(resolution.interp, "the loader of")] if resolution.interp else []
        needs += [(obj, "needed at start-up by") for obj in resolution.libraries]
        for obj, role in needs:
            path = _absolute(obj.name)
            if path in warned or plan.resolves(path):
                continue
            warned.add(path)
            needed_by = obj.loader.name if obj.loader else resolution.program
            logger.warning("--exclude leaves out %s, %s %s, which will not start from the "
                           "archive without it", obj.name, role, needed_by)


def _check_missing(collection: Collection, allow: bool) -> None:
    for m in collection.missing:
        message = f"library {m.name!r} needed by {m.needed_by} cannot be found"
        if not allow:
            raise MissingLibraries(message, "install it, or pass --allow-missing to pack anyway",
                                   collection.report())
        logger.warning("%s; packing without it (--allow-missing)", message)


def _root_cache(plan: Plan, resolutions: list[Resolution], model: LoaderModel) -> bytes:
    """The host's ld.so.cache restricted to the packed libraries, so that the loader in the
    root finds each of them exactly where it found them on this host."""
    names: dict[tuple[int, int], set[str]] = {}
    for m in plan.members.values():
        if m.type == "file" and m.file_id is not None:
            names.setdefault(m.file_id, set()).add(os.path.basename(m.path))
    for resolution in resolutions:
        for obj in resolution.libraries:
            if obj.dynamic.soname and obj.file_id in names:
                names[obj.file_id].add(obj.dynamic.soname)
    entries = []
    for entry in model.cache:
        try:
            st = os.stat(entry.value)
        except OSError:
            continue
        if entry.key in names.get((st.st_dev, st.st_ino), ()):
            if plan.add_object(entry.value, "named by ld.so.cache") is not None:
                entries.append(entry)
    from rpack import __version__

    entries += _environment_entries(plan, resolutions, model)
    return ldcache.build_cache(entries, generator=f"rpack {__version__}")


def _environment_entries(plan: Plan, resolutions: list[Resolution],
                         model: LoaderModel) -> list[ldcache.CacheEntry]:
    """Cache entries for libraries found through LD_LIBRARY_PATH (given with --env): the root
    must work without any variable, under a plain chroot too (format.md section 3)."""
    flags = model.cache_flags if model.cache_flags is not None else 0x0003
    entries = {}
    for resolution in resolutions:
        for obj in resolution.libraries:
            if obj.how != "LD_LIBRARY_PATH" or not obj.name.startswith("/"):
                continue
            key = obj.dynamic.soname or os.path.basename(obj.name)
            for path in (obj.name, *_hwcaps_variants(obj, model)):
                parent = os.path.basename(os.path.dirname(os.path.dirname(path)))
                subdir = os.path.basename(os.path.dirname(path)) \
                    if parent == "glibc-hwcaps" else None
                entries[path] = ldcache.CacheEntry(key, path, flags, 0, subdir)
    return list(entries.values())


def _musl_path_file(plan: Plan, model: LoaderModel, note: Any) -> None:
    arch = os.path.basename(model.interp).removeprefix("ld-musl-").removesuffix(".so.1")
    path = f"/etc/ld-musl-{arch}.path"
    if os.path.exists(path):
        plan.add_object(path, "musl library path")
        note(path, path, "generated", "the musl loader's library path")


def platform_of(collection: Collection) -> dict[str, Any]:
    """The manifest's platform: what a host must offer to run the programs."""
    model = collection.model
    first = collection.resolutions[0].objects[0].dynamic.header
    libc = model.libc if model else "none"
    libc_path = None
    for resolution in collection.resolutions:
        for obj in resolution.libraries:
            if obj.dynamic.soname in ("libc.so.6", "libc.musl-x86_64.so.1"):
                libc_path = obj.name
    version = glibc_version(libc_path) if libc_path and libc == "glibc" else None
    kernel_source = libc_path or collection.programs[0]
    return {
        "machine": first.machine_name,
        "elf_class": first.elf_class,
        "endian": "little" if first.little_endian else "big",
        "libc": libc,
        "libc_version": version,
        "min_kernel": abi_note(kernel_source),
    }


def build_manifest(collection: Collection, options: Options, members: list[Member],
                   digests: dict[str, Hashed]) -> dict[str, Any]:
    from rpack import __version__

    entrypoint = options.entrypoint or collection.programs[0]
    env = {"PATH": DEFAULT_PATH}
    env.update(options.env)
    entries = manifest_entries(members, digests)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "generator": f"rpack {__version__}",
        "platform": platform_of(collection),
        "entrypoint": [entrypoint],
        "programs": collection.programs,
        "env": env,
        "workdir": options.workdir,
        "entries": entries,
        "totals": {"entries": len(entries), "bytes": sum(e.get("size", 0) for e in entries)},
    }
    if collection.trace is not None:
        # What --trace ran and used, for `rpack inspect` (readers ignore unknown keys).
        traced = {item.path for item in collection.items if item.kind == "traced"}
        manifest["trace"] = collection.trace.summary(traced)
    return manifest


@dataclass
class Written:
    identity: str | None  # computed only when the log shows it
    tar_size: int
    members: int


def create(options: Options, out: BinaryIO, level: int = 3, threads: int = 0,
           quiet: bool = False) -> Written:
    """Pack the programs of `options` into `out`, with progress bars unless `quiet`."""
    collection = collect(options)
    epoch = source_date_epoch()
    members = collection.plan.finish(epoch)
    mtime = max((m.mtime for m in members if m.mtime is not None), default=0)
    total = sum(m.size for m in members if m.type == "file")
    with bar("hashing", total, quiet) as progress:
        digests = hash_sources(members, progress.update)
    manifest = build_manifest(collection, options, members, digests)
    with bar("packing", total, quiet) as progress:
        identity, size = write_archive(out, manifest, members, digests, mtime, level, threads,
                                       progress.update, logger.isEnabledFor(logging.INFO))
    logger.info("packed %d programs, %d members, %s of files; identity sha256:%s",
                len(collection.programs), len(members) + 1,
                _human(manifest["totals"]["bytes"]), identity)
    return Written(identity, size, len(members) + 1)


def source_date_epoch() -> int | None:
    """SOURCE_DATE_EPOCH, which clamps every time stamp (reproducible-builds.org)."""
    text = os.environ.get("SOURCE_DATE_EPOCH")
    if text is None:
        return None
    # A tar header holds 11 octal digits; a larger time would need a pax record.
    if not text.isdigit() or int(text) >= 8**11:
        raise PackError(f"SOURCE_DATE_EPOCH={text!r} is not a time in seconds since 1970",
                        hint="set it to a whole number such as $(git log -1 --format=%ct)")
    return int(text)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"
