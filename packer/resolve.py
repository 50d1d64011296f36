"""Which files the dynamic loader maps for a program, decided from the ELF files alone.

The search follows glibc 2.36 and musl 1.2.3 rule for rule (shared/spec/loader.md): objects load
breadth-first in DT_NEEDED order; a name already loaded (by path, requested name or DT_SONAME) or
a file already loaded under another name (device and inode) is reused; other names are searched
through DT_RPATH and its inheritance, LD_LIBRARY_PATH, DT_RUNPATH, the ld.so cache and the
default directories, each directory probed with its glibc-hwcaps subdirectories first. Nothing
here runs the program: only the host's loader is asked for its parameters (ldso.probe).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from .elf import ET_DYN, ET_EXEC, Check, Dynamic, Verdict, check_candidate, read_dynamic
from .errors import PackError
from .ldso import LoaderModel, probe

logger = logging.getLogger(__name__)

_DST = re.compile(r"\$(?:\{(ORIGIN|LIB|PLATFORM)\}|(ORIGIN|LIB|PLATFORM)(?![A-Za-z0-9_]))")
# musl resolves these names to itself (ldso/dynlink.c load_library).
_MUSL_ORIGIN = re.compile(r"\$\{ORIGIN\}|\$ORIGIN")
_MUSL_RESERVED = {"c", "pthread", "rt", "m", "dl", "util", "xnet"}


@dataclass(eq=False)
class LoadedObject:
    """One object of the link map: the program, the loader or a library."""

    name: str                       # the path it was opened by (l_name), as the loader spells it
    dynamic: Dynamic
    file_id: tuple[int, int]
    origin: str | None              # what $ORIGIN expands to for this object's own lists
    names: set[str] = field(default_factory=set)
    loader: LoadedObject | None = None      # the object that first caused it to load (l_loader)
    aliases: list[str] = field(default_factory=list)    # other paths a search found it by
    how: str = ""                   # how it was found, for `rpack deps`


@dataclass(frozen=True)
class Missing:
    name: str
    needed_by: str


@dataclass
class Resolution:
    """The link map one program gets at start-up."""

    program: str
    model: LoaderModel | None       # None for a static program
    interp: LoadedObject | None
    objects: list[LoadedObject]     # the program first, then preloads and libraries in load order
    missing: list[Missing] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)     # DT_NEEDED entries the loader skips

    @property
    def libraries(self) -> list[LoadedObject]:
        return self.objects[1:]


class _Unexpandable(Exception):
    pass


class Resolver:
    """Resolves programs against this host's loaders; parsed objects are shared across calls."""

    def __init__(self, env: Mapping[str, str] | None = None, cwd: str | None = None) -> None:
        self.env = dict(env or {})     # the run-time environment, never rpack's own
        self.cwd = cwd or os.getcwd()
        self._dynamic: dict[tuple[int, int], Dynamic] = {}

    def read(self, path: str) -> tuple[Dynamic, tuple[int, int]]:
        try:
            st = os.stat(self.host_path(path))
        except OSError as e:
            raise PackError(f"cannot read {path!r}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise PackError(f"{path!r} is not a regular file")
        file_id = (st.st_dev, st.st_ino)
        if file_id not in self._dynamic:
            self._dynamic[file_id] = read_dynamic(self.host_path(path))
        return self._dynamic[file_id], file_id

    def host_path(self, path: str) -> str:
        """Where a path the loader would open relative to its CWD is on this host."""
        return os.path.join(self.cwd, path)

    def resolve(self, program: str) -> Resolution:
        """The link map of `program` (a path on this host), as its loader would build it."""
        dynamic, file_id = self.read(program)
        if dynamic.header.e_type not in (ET_EXEC, ET_DYN):
            raise PackError(f"{program!r} is not an executable (ELF type {dynamic.header.e_type})")
        # The kernel takes the program's $ORIGIN from its real path (/proc/self/exe).
        origin = os.path.dirname(os.path.realpath(self.host_path(program)))
        exe = LoadedObject(program, dynamic, file_id, origin, how="program")
        if dynamic.soname:
            exe.names.add(dynamic.soname)
        if dynamic.interp is None:
            return Resolution(program, None, None, [exe])
        model = probe(dynamic.interp)
        if (dynamic.header.elf_class, dynamic.header.machine) != (model.elf_class, model.machine):
            raise PackError(f"{program!r} is {dynamic.header.elf_class}-bit "
                            f"{dynamic.header.machine_name} but its loader {dynamic.interp!r} is "
                            f"{model.elf_class}-bit {model.machine_name}")
        interp_dynamic, interp_id = self.read(dynamic.interp)
        interp = LoadedObject(dynamic.interp, interp_dynamic, interp_id, None,
                              {dynamic.interp}, how=f"PT_INTERP of {program}")
        if interp_dynamic.soname:
            interp.names.add(interp_dynamic.soname)
        return _LinkMap(self, model, exe, interp).build()

    def resolve_module(self, path: str, model: LoaderModel) -> Resolution:
        """The libraries a loaded module pulls in, as if a program dlopen'ed it by path.

        XXX: the dlopen caller's DT_RPATH and the program's are not known here, so only the
        module's own lists, LD_LIBRARY_PATH, the cache and the default directories are searched.
        """
        dynamic, file_id = self.read(path)
        module = LoadedObject(path, dynamic, file_id, os.path.dirname(self.host_path(path)),
                              how="module")
        if dynamic.soname:
            module.names.add(dynamic.soname)
        interp_dynamic, interp_id = self.read(model.interp)
        interp = LoadedObject(model.interp, interp_dynamic, interp_id, None, {model.interp},
                              how="loader")
        if interp_dynamic.soname:
            interp.names.add(interp_dynamic.soname)
        return _LinkMap(self, model, module, interp, preload=False).build()


class _LinkMap:
    """One program's link map under construction."""

    def __init__(self, resolver: Resolver, model: LoaderModel, exe: LoadedObject,
                 interp: LoadedObject, preload: bool = True) -> None:
        self.resolver = resolver
        self.model = model
        self.musl = model.libc == "musl"
        self.exe = exe
        self.interp = interp
        self.objects = [exe]
        self.result = Resolution(exe.name, model, interp, self.objects)
        self.preload = preload

    def build(self) -> Resolution:
        if self.preload:
            self._preload()
        # Breadth-first: every object appended to the list is visited after those before it.
        index = 0
        while index < len(self.objects):
            requester = self.objects[index]
            for name in requester.dynamic.needed:
                self._need(requester, name)
            index += 1
        return self.result

    def _preload(self) -> None:
        for entry in re.split(r"[ :]+", self.resolver.env.get("LD_PRELOAD", "")):
            if not entry:
                continue
            before = len(self.result.missing)
            self._need(self.exe, entry)
            if len(self.result.missing) > before:
                # The loader only warns about a missing preload and starts the program anyway.
                missing = self.result.missing.pop()
                logger.warning("%s: LD_PRELOAD entry %r cannot be found; the loader ignores it",
                               self.exe.name, missing.name)

    def _loaded(self) -> Iterator[LoadedObject]:
        yield from self.objects
        yield self.interp

    def _need(self, requester: LoadedObject, needed: str) -> None:
        if self.musl:
            self._need_musl(requester, needed)
            return
        try:
            name = self._expand(needed, requester)
        except _Unexpandable:
            # glibc drops such an entry silently; the program fails later on a missing symbol.
            self.result.dropped.append(f"{needed} (needed by {requester.name})")
            return
        for obj in self._loaded():
            if name in obj.names or name == obj.dynamic.soname:
                obj.names.add(name)
                return
        self._load(name, requester)

    def _load(self, name: str, requester: LoadedObject) -> None:
        """Open a name that no loaded object answers to: as written if it has a slash (never
        searched), else through the search order."""
        found: tuple[str, str] | None
        if "/" in name:
            check = self._check(name)
            if check.verdict is Verdict.FATAL:
                raise self._fatal(name, check, requester)
            found = (name, "named by path in DT_NEEDED") if check.verdict is Verdict.OK else None
        elif self.musl:
            found = self._search_musl(name, requester)
        else:
            found = self._search(name, requester)
        if found is None:
            self.result.missing.append(Missing(name, requester.name))
            return
        self._add(found[0], name, requester, found[1])

    def _add(self, path: str, name: str, requester: LoadedObject, how: str) -> None:
        dynamic, file_id = self.resolver.read(path)
        for obj in self._loaded():
            if obj.file_id == file_id:
                # The same file under another name is reused, but the loader in the root must
                # find that name too, to make the same decision.
                obj.names.add(name)
                if path != obj.name and path not in obj.aliases:
                    obj.aliases.append(path)
                return
        origin = os.path.dirname(path)
        if not origin.startswith("/"):
            origin = os.path.join(self.resolver.cwd, origin) if origin else self.resolver.cwd
        obj = LoadedObject(path, dynamic, file_id, origin, {name, path}, loader=requester, how=how)
        logger.debug("%s: %s -> %s (%s)", requester.name, name, path, how)
        self.objects.append(obj)

    def _check(self, candidate: str) -> Check:
        if self.musl:
            return _check_musl(self.resolver.host_path(candidate), self.model)
        return check_candidate(self.resolver.host_path(candidate), self.model.elf_class,
                               self.model.machine)

    def _fatal(self, candidate: str, check: Check, requester: LoadedObject) -> PackError:
        return PackError(
            f"{candidate}: {check.reason} (a candidate for a library of {requester.name}; "
            "the loader would refuse to start the program)",
            hint="remove or rename the bad file, or put a valid library before it")

    def _expand(self, text: str, owner: LoadedObject) -> str:
        def substitute(match: re.Match[str]) -> str:
            token = match.group(1) or match.group(2)
            if token == "ORIGIN":
                if owner.origin is None:
                    raise _Unexpandable
                return owner.origin
            value = self.model.lib if token == "LIB" else self.model.platform
            if not value:
                raise _Unexpandable
            return value

        return _DST.sub(substitute, text)

    def _path_list(self, text: str, owner: LoadedObject, separators: str) -> list[str]:
        directories = []
        for element in re.split(f"[{separators}]", text):
            try:
                expanded = self._expand(element, owner)
            except _Unexpandable:
                continue
            directories.append(expanded.rstrip("/") or ("/" if expanded else ""))
        return directories

    def _search_lists(self, requester: LoadedObject) -> Iterator[tuple[list[str], str]]:
        """glibc's steps a to c: the directory lists searched before the cache."""
        if requester.dynamic.runpath is None:
            owner: LoadedObject | None = requester
            while owner is not None:
                if owner.dynamic.rpath is not None:
                    yield (self._path_list(owner.dynamic.rpath, owner, ":"),
                           f"DT_RPATH of {owner.name}")
                owner = owner.loader
            if requester is not self.exe and self.exe.dynamic.rpath is not None:
                yield self._path_list(self.exe.dynamic.rpath, self.exe, ":"), "DT_RPATH of program"
        if "LD_LIBRARY_PATH" in self.resolver.env:
            yield (self._path_list(self.resolver.env["LD_LIBRARY_PATH"], self.exe, ":;"),
                   "LD_LIBRARY_PATH")
        if requester.dynamic.runpath is not None:
            yield (self._path_list(requester.dynamic.runpath, requester, ":"),
                   f"DT_RUNPATH of {requester.name}")

    def _search(self, name: str, requester: LoadedObject) -> tuple[str, str] | None:
        for directories, how in self._search_lists(requester):
            found = self._search_dirs(directories, name, requester)
            if found:
                return found, how
        nodeflib = requester.dynamic.nodeflib
        cached = self.model.cache_lookup(name)
        if cached and nodeflib and any(cached.startswith(d + "/") for d in self.model.system_dirs):
            cached = None
        if cached:
            check = self._check(cached)
            if check.verdict is Verdict.OK:
                return cached, "ld.so.cache"
            if check.verdict is Verdict.FATAL:
                raise self._fatal(cached, check, requester)
        if not nodeflib:
            found = self._search_dirs(list(self.model.system_dirs), name, requester)
            if found:
                return found, "default directory"
        return None

    def _search_dirs(self, directories: list[str], name: str,
                     requester: LoadedObject) -> str | None:
        for directory in directories:
            for sub in (*self.model.subdirs, ""):
                candidate = _join(_join(directory, sub), name)
                check = self._check(candidate)
                if check.verdict is Verdict.OK:
                    return candidate
                if check.verdict is Verdict.FATAL:
                    raise self._fatal(candidate, check, requester)
        return None

    def _need_musl(self, requester: LoadedObject, name: str) -> None:
        stem = name[3:].split(".", 1)[0] if name.startswith("lib") else None
        if stem in _MUSL_RESERVED or name == os.path.basename(self.model.interp):
            self.interp.names.add(name)
            return
        if "/" not in name:
            for obj in self._loaded():
                if os.path.basename(obj.name) == name:
                    return
        self._load(name, requester)

    def _search_musl(self, name: str, requester: LoadedObject) -> tuple[str, str] | None:
        lists: list[tuple[list[str], str]] = []
        if "LD_LIBRARY_PATH" in self.resolver.env:
            lists.append(([d for d in self.resolver.env["LD_LIBRARY_PATH"].split(":") if d],
                          "LD_LIBRARY_PATH"))
        # musl inherits both DT_RUNPATH and DT_RPATH up the chain of first requesters, and
        # ignores a whole list that holds any token but $ORIGIN.
        owner: LoadedObject | None = requester
        while owner is not None:
            text = owner.dynamic.runpath if owner.dynamic.runpath is not None \
                else owner.dynamic.rpath
            # musl matches "$ORIGIN" as a prefix, unlike glibc's whole-token rule.
            if text is not None and "$" not in _MUSL_ORIGIN.sub("", text):
                origin = (owner.origin or "").replace("\\", "\\\\")
                expanded = _MUSL_ORIGIN.sub(origin, text)
                lists.append(([d for d in expanded.split(":") if d], f"rpath of {owner.name}"))
            owner = owner.loader
        lists.append((list(self.model.system_dirs), "musl system path"))
        for directories, how in lists:
            for directory in directories:
                candidate = _join(directory, name)
                check = self._check(candidate)
                if check.verdict is Verdict.OK:
                    return candidate, how
                if check.verdict is Verdict.FATAL:
                    raise self._fatal(candidate, check, requester)
        return None


def _join(directory: str, name: str) -> str:
    if not directory:
        return name
    if not name:
        return directory
    return directory + name if directory.endswith("/") else f"{directory}/{name}"


def _check_musl(path: str, model: LoaderModel) -> Check:
    # musl maps the first file it can open: no silent skips, any bad ELF is fatal.
    check = check_candidate(path, model.elf_class, model.machine)
    if check.verdict is Verdict.SKIP:
        return Check(Verdict.FATAL, f"Exec format error ({check.reason})")
    return check
