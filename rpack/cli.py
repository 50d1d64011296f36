"""The `rpack` command line: parses arguments, sets up logging, maps errors to exit codes."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, BinaryIO, NoReturn

from . import __version__

if TYPE_CHECKING:
    from packer.pack import Options
    from runner import Bind
    from unpacker.limits import Limits

logger = logging.getLogger("rpack")

EXIT_FAILURE = 1
EXIT_RUN_FAILURE = 125
# Read here rather than from runner.cache, which the CLI imports only for the commands using it.
CACHE_SIZE_VARIABLE = "RPACK_CACHE_SIZE"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = {"WARNING": "warning", "ERROR": "error", "DEBUG": "debug"}.get(record.levelname)
        prefix = f"rpack: {level}: " if level else "rpack: "
        return prefix + record.getMessage()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Standard error; while a progress bar may show (tqdm is loaded), through tqdm, so that
    the line goes above the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is None:
            super().emit(record)
            return
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class _Parser(argparse.ArgumentParser):
    """Usage errors in rpack's own shape: one `rpack: error:` line and a hint, exit 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("rpack").strip()
        _error(message, f"see 'rpack {command + ' ' if command else ''}--help'")
        sys.exit(2)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _stored_key_value(text: str) -> tuple[str, str]:
    """KEY=VALUE for the archive's manifest, whose readers refuse control characters."""
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text):
        raise argparse.ArgumentTypeError(f"control character in {text!r}: the archive's "
                                         "readers would refuse it")
    return _key_value(text)


def _bind(text: str) -> Bind:
    from runner import Bind

    try:
        return Bind.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    # Accepted before and after the command; a subcommand's copy must not reset the top's.
    parser.add_argument("-q", "--quiet", action="store_true",
                        default=False if top else argparse.SUPPRESS, help="only errors")
    parser.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                        help="say more (twice: debug)")
    parser.add_argument("--debug", action="store_true",
                        default=False if top else argparse.SUPPRESS,
                        help="debug output and tracebacks")


def _size(text: str) -> int:
    """A size in bytes: a number, optionally with a K, M, G or T suffix (powers of 1024)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:].upper())
    number = text[:-1] if scale else text
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"expected a size such as 512M or 2G, got {text!r}")
    return int(number) * (scale or 1)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return int(text)


def _threads(text: str) -> int:
    if not text.isdigit() or int(text) > 256:
        raise argparse.ArgumentTypeError(f"expected 0 to 256 threads, got {text!r}")
    return int(text)


def _unpack_options(parser: argparse.ArgumentParser, extracting: bool) -> None:
    """The reader's limits and, for commands that extract, what to trust the archive with."""
    from unpacker.limits import GiB, Limits

    default = Limits()
    limits = parser.add_argument_group("limits (an archive over one is refused)")
    limits.add_argument("--max-total-size", type=_size, metavar="SIZE",
                        help=f"files adding up to more (default {default.max_total_bytes // GiB}G)")
    limits.add_argument("--max-member-size", type=_size, metavar="SIZE",
                        help=f"a file larger (default {default.max_member_size // GiB}G)")
    limits.add_argument("--max-members", type=_count, metavar="N",
                        help=f"more members (default {default.max_members})")
    limits.add_argument("--max-depth", type=_count, metavar="N",
                        help=f"a path deeper (default {default.max_depth})")
    if extracting:
        parser.add_argument("--trust-setuid", action="store_true",
                            help="keep setuid and setgid bits (default: stripped)")


def _limits(args: argparse.Namespace) -> Limits:
    from unpacker.limits import Limits

    given = {"max_total_bytes": args.max_total_size, "max_member_size": args.max_member_size,
             "max_members": args.max_members, "max_depth": args.max_depth}
    return Limits(**{key: value for key, value in given.items() if value is not None})


def _reference(text: str) -> str:
    from packer.oci import parse_reference

    try:
        return parse_reference(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _export_command(commands: argparse._SubParsersAction[_Parser]) -> None:
    export = commands.add_parser("export-oci", help="make a container image of an archive",
                                 description="Write ARCHIVE to OUT as a one-layer container "
                                 "image: one tar that is an OCI image layout (oci-archive:OUT "
                                 "for skopeo and podman) and a docker archive (docker load, "
                                 "podman load).")
    _common(export, top=False)
    _unpack_options(export, extracting=False)
    export.add_argument("-f", "--force", action="store_true", help="overwrite OUT")
    export.add_argument("--tag", type=_reference, metavar="NAME[:TAG]",
                        help="the image's name (default: ARCHIVE's file name without .tar.zst, "
                        "tag latest; rpack:latest for stdin)")
    export.add_argument("--compression", choices=("gzip", "zstd", "none"), default="gzip",
                        help="how the layer is compressed (default gzip, which every engine "
                        "reads)")
    export.add_argument("archive", metavar="ARCHIVE", help="archive file, or - for stdin")
    export.add_argument("out", metavar="OUT", help="output file, or - for stdout")


def _unpack_commands(commands: argparse._SubParsersAction[_Parser]) -> None:
    extract = commands.add_parser("extract", help="check an archive and unpack it",
                                  description="Check ARCHIVE and unpack it into DIR, new or "
                                  "empty; a refused or failed extraction leaves DIR empty.")
    _common(extract, top=False)
    _unpack_options(extract, extracting=True)
    extract.add_argument("--numeric-owner", action="store_true",
                         help="give files the archive's numeric uid and gid (root only; "
                         "default: owned by the extracting user)")
    extract.add_argument("archive", metavar="ARCHIVE", help="archive file, or - for stdin")
    extract.add_argument("dir", metavar="DIR", help="where to unpack: a new or empty directory")

    listing = commands.add_parser("list", help="list the members, like tar -tv",
                                  description="List ARCHIVE's members as tar -tv does, "
                                  "checking each as it streams past.")
    _common(listing, top=False)
    _unpack_options(listing, extracting=False)
    listing.add_argument("--json", action="store_true", help="one JSON list of members")
    listing.add_argument("archive", metavar="ARCHIVE", help="archive file, or - for stdin")

    inspect = commands.add_parser("inspect", help="summarise an archive",
                                  description="Check ARCHIVE and show its programs, entrypoint, "
                                  "platform, sizes and identity (the sha256 of its tar).")
    _common(inspect, top=False)
    _unpack_options(inspect, extracting=False)
    inspect.add_argument("--json", action="store_true", help="one JSON object")
    inspect.add_argument("archive", metavar="ARCHIVE", help="archive file, or - for stdin")

    verify = commands.add_parser("verify", help="check an archive, writing nothing",
                                 description="Run every check of extract over ARCHIVE, "
                                 "writing nothing.")
    _common(verify, top=False)
    _unpack_options(verify, extracting=False)
    verify.add_argument("--any-platform", action="store_true",
                        help="do not check that this host can run the archive's programs")
    verify.add_argument("archive", metavar="ARCHIVE", help="archive file, or - for stdin")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rpack",
        description="Pack a Linux program with everything it needs into one root-filesystem "
                    "tar.zst, and run it anywhere.")
    parser.add_argument("--version", action="version", version=f"rpack {__version__}")
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    resolve = _Parser(add_help=False)
    resolve.add_argument("--add", action="append", default=[], metavar="PATH",
                         help="also pack a file or a tree (symlinks in it kept, not followed); "
                         "ELF files in it get their libraries")
    resolve.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                         help="leave out paths matching GLOB")
    resolve.add_argument("--env", action="append", default=[], type=_stored_key_value,
                         metavar="KEY=VALUE", help="run-time environment (stored in the archive; "
                         "LD_LIBRARY_PATH and LD_PRELOAD here take part in resolution)")
    resolve.add_argument("--allow-missing", action="store_true",
                         help="warn instead of failing on a library that cannot be found")
    resolve.add_argument("--trace", action="store_true",
                         help="run the entrypoint once here under strace, with the arguments "
                         "given after --, and also pack what it opened and executed")
    resolve.add_argument("--trace-exclude", action="append", default=[], metavar="GLOB",
                         help="leave out traced paths matching GLOB (or under a match)")
    resolve.add_argument("--trace-include", action="append", default=[], metavar="GLOB",
                         help="keep traced paths matching GLOB that the default exclude "
                         "list would leave out")

    create = commands.add_parser("create", parents=[resolve], help="pack programs",
                                 description="Pack PROGRAMs and what they need into ARCHIVE.")
    _common(create, top=False)
    create.add_argument("-f", "--force", action="store_true", help="overwrite ARCHIVE")
    create.add_argument("--entrypoint", metavar="PATH", help="the default program")
    create.add_argument("--workdir", default="/", metavar="DIR",
                        help="the default working directory")
    create.add_argument("-l", "--level", type=int, default=3, choices=range(1, 23),
                        metavar="LEVEL", help="zstd level, 1 to 22 (default 3)")
    create.add_argument("-T", "--threads", type=_threads, default=0, metavar="THREADS",
                        help="zstd threads, up to 256 (default 0: all cores)")
    create.add_argument("archive", metavar="ARCHIVE", help="output file, or - for stdout")
    create.add_argument("programs", nargs="+", metavar="PROGRAM")

    deps = commands.add_parser("deps", parents=[resolve], help="show what create would pack",
                               description="Print what create would pack, and why.")
    _common(deps, top=False)
    deps.add_argument("--json", action="store_true", help="one JSON object")
    deps.add_argument("programs", nargs="+", metavar="PROGRAM")

    run = commands.add_parser("run", help="run a packed program",
                              description="Unpack ARCHIVE into a private root, or reuse the "
                              "root cached by an earlier run of it, and run its entrypoint there "
                              "with ARGs.")
    _common(run, top=False)
    _unpack_options(run, extracting=True)
    run.add_argument("--entrypoint", metavar="PATH", help="run another packed program")
    run.add_argument("--env", action="append", default=[], type=_key_value,
                     metavar="KEY=VALUE", help="set a variable for the program")
    run.add_argument("--workdir", metavar="DIR", help="working directory inside the root")
    run.add_argument("--keep", action="store_true", help="keep the root and say where it is")
    run.add_argument("--tmpdir", metavar="DIR",
                     help="where the temporary root goes (default: $TMPDIR or /tmp)")
    run.add_argument("--bind", action="append", default=[], type=_bind,
                     metavar="SRC[:DST[:ro]]", help="let the program see the host path SRC at "
                     "DST (default: the same path), read-only with :ro")
    run.add_argument("--no-host-files", action="store_true",
                     help="do not bind the host's /etc/resolv.conf and /etc/hosts read-only "
                     "into the root")
    run.add_argument("--no-cache", action="store_true",
                     help="unpack the archive for this run only, neither using nor filling "
                     "the cache of unpacked roots")
    run.add_argument("--cache-size", type=_size, metavar="SIZE",
                     help=f"the cache's limit; the least recently used roots go first "
                     f"(default: ${CACHE_SIZE_VARIABLE} or 4G)")
    run.add_argument("archive", metavar="ARCHIVE", help="archive file, or - for stdin")
    # argparse calls a REMAINDER positional required; no ARG at all is fine.
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG").required = False
    _unpack_commands(commands)
    _export_command(commands)
    _cache_commands(commands)
    return parser


def _cache_commands(commands: argparse._SubParsersAction[_Parser]) -> None:
    cache = commands.add_parser("cache", help="list or empty the cache of unpacked roots",
                                description="The roots that rpack run unpacked and keeps for "
                                "the next run of the same archive.")
    _common(cache, top=False)
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION",
                                   parser_class=_Parser)
    for name, text in (("list", "show the cached roots, most recently used first"),
                       ("clean", "delete every cached root no run is using")):
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _common(action, top=False)
        action.add_argument("--tmpdir", metavar="DIR",
                            help="the runs' temporary directory, which holds the cache "
                            "(default: $TMPDIR or /tmp)")


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.INFO
    if args.quiet:
        level = logging.ERROR
    elif args.debug or args.verbose >= 2:
        level = logging.DEBUG
    elif args.verbose == 0:
        level = logging.WARNING
    handler = _Handler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _error(message: str, hint: str | None = None) -> None:
    print(f"rpack: error: {message}", file=sys.stderr)
    if hint:
        print(f"rpack: hint: {hint}", file=sys.stderr)


def _options(args: argparse.Namespace) -> Options:
    from packer.pack import Options

    return Options(programs=args.programs, adds=args.add, excludes=args.exclude,
                   entrypoint=getattr(args, "entrypoint", None), env=dict(args.env),
                   workdir=getattr(args, "workdir", "/"), allow_missing=args.allow_missing,
                   trace=args.trace, trace_args=args.trace_args,
                   trace_excludes=args.trace_exclude, trace_includes=args.trace_include)


def cmd_create(args: argparse.Namespace) -> int:
    from packer.archive import open_output
    from packer.pack import create

    with open_output(args.archive, args.force) as out:
        create(_options(args), out, args.level, args.threads, quiet=args.quiet)
    return 0


def cmd_deps(args: argparse.Namespace) -> int:
    from packer.errors import MissingLibraries
    from packer.pack import collect

    try:
        report = collect(_options(args)).report()
    except MissingLibraries as e:
        if args.json:
            # The whole object all the same, `missing` filled in; the exit status still fails.
            json.dump(e.report, sys.stdout, indent=1)
            print()
        raise
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
        return 0
    for item in report["files"]:
        print(f"{item['kind']:<18} {item['path']}  ({item['why']})")
    for missing in report["missing"]:
        print(f"{'missing':<18} {missing['name']}  (needed by {missing['needed_by']})")
    return 0


def _cache_size(args: argparse.Namespace) -> int:
    from runner.cache import DEFAULT_SIZE

    if args.cache_size is not None:
        return int(args.cache_size)
    text = os.environ.get(CACHE_SIZE_VARIABLE)
    if not text:
        return DEFAULT_SIZE
    try:
        return _size(text)
    except argparse.ArgumentTypeError as e:
        from runner import RunError

        raise RunError(f"${CACHE_SIZE_VARIABLE}: {e}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from runner.launch import launch

    return launch(args.archive, args.args, entrypoint=args.entrypoint, env=dict(args.env),
                  workdir=args.workdir, tmpdir=args.tmpdir, keep=args.keep,
                  binds=args.bind, limits=_limits(args), trust_setuid=args.trust_setuid,
                  host_files=not args.no_host_files, cache=not args.no_cache,
                  cache_size=_cache_size(args), quiet=args.quiet)


def cmd_cache(args: argparse.Namespace) -> int:
    import time

    from runner.cache import open_cache

    cache = open_cache(args.tmpdir)
    try:
        if args.action == "clean":
            removed, busy = cache.clean()
            if not args.quiet:
                print(f"removed {removed} cached roots"
                      + (f"; {busy} in use stay" if busy else ""))
            return 0
        for name, size, used, in_use in cache.listing():
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(used))
            print(f"{name}  {size / (1 << 20):9.1f} MiB  used {when}"
                  + ("  in use" if in_use else ""))
        return 0
    finally:
        cache.close()


@contextlib.contextmanager
def _reading(args: argparse.Namespace, what: str, shown: bool = True) -> Iterator[BinaryIO]:
    """The archive, with a bar that follows how much of it has been read (unless not `shown`):
    what the command prints to the terminal goes after the block, once the bar is gone."""
    from unpacker import open_archive
    from unpacker.progress import reading

    with open_archive(args.archive) as source, \
            reading(source, what, args.quiet or not shown) as (counted, _):
        yield counted


def cmd_extract(args: argparse.Namespace) -> int:
    from unpacker import extract_to

    with _reading(args, "unpacking") as source:
        extract_to(source, args.dir, limits=_limits(args), trust_setuid=args.trust_setuid,
                   numeric_owner=args.numeric_owner)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from unpacker import TarLines, list_members

    # The lines stream out as tar -tv prints them, which a bar would break into.
    with _reading(args, "reading", shown=args.json) as source:
        members = list_members(source, limits=_limits(args))
        if not args.json:
            lines = TarLines()
            for member in members:
                print(lines.line(member))
            return 0
        # Printed once the whole archive has passed every check.
        listed = [member.as_json() for member in members]
    json.dump(listed, sys.stdout, indent=1)
    print()
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from unpacker import inspect

    with _reading(args, "reading") as source:
        summary = inspect(source, limits=_limits(args))
    if args.json:
        json.dump(summary.as_json(), sys.stdout, indent=1)
        print()
    else:
        print("\n".join(summary.lines()))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from unpacker import verify

    with _reading(args, "verifying") as source:
        summary = verify(source, limits=_limits(args), check_platform=not args.any_platform)
    if not args.quiet:
        print(f"{args.archive}: ok, {summary.members} members, "
              f"identity sha256:{summary.identity}")
    return 0


def cmd_export_oci(args: argparse.Namespace) -> int:
    from packer.archive import open_output
    from packer.oci import default_reference, export_oci
    from unpacker import open_archive

    # The layer waits in a temporary file beside OUT: same filesystem, and not $TMPDIR's tmpfs.
    layer_dir = None if args.out == "-" else os.path.dirname(os.path.abspath(args.out))
    with open_archive(args.archive) as source, open_output(args.out, args.force) as out:
        export_oci(source, out, args.tag or default_reference(args.archive),
                   compression=args.compression, limits=_limits(args), layer_dir=layer_dir,
                   quiet=args.quiet)
    return 0


def _program_arguments(argv: list[str], archive: str, parsed: list[str]) -> list[str]:
    """Everything after the archive belongs to the program, a leading `--` too, which argparse
    would swallow."""
    for index in range(len(argv) - 1, -1, -1):
        if argv[index] == archive and argv[index + 1:] == ["--", *parsed]:
            return ["--", *parsed]
    return parsed


def _split_trace_arguments(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """For create and deps, what follows the first `--`: the traced run's arguments."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command not in ("create", "deps") or "--" not in argv:
        return argv, None
    split = argv.index("--")
    return argv[:split], argv[split + 1:]


COMMANDS = {"create": cmd_create, "deps": cmd_deps, "run": cmd_run, "extract": cmd_extract,
            "list": cmd_list, "inspect": cmd_inspect, "verify": cmd_verify,
            "export-oci": cmd_export_oci, "cache": cmd_cache}


TERMINATING = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


class Terminated(BaseException):
    """A terminating signal arrived; raised where rpack was, so cleanups run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _fill_closed_descriptors() -> set[int]:
    """Put /dev/null on whichever of 0, 1 and 2 is closed, and say which were.

    Otherwise the next file opened takes that number, and a program rpack runs would get the
    archive, say, as its standard output.
    """
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(fd)
    if closed:
        null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: the first closed
        os.set_inheritable(null, True)  # a standard descriptor, as programs expect
        for fd in closed - {null}:
            os.dup2(null, fd)
    if 2 in closed:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    return closed


def _writes_standard_output(args: argparse.Namespace) -> bool:
    if args.command == "create":
        return bool(args.archive == "-")
    if args.command == "export-oci":
        return bool(args.out == "-")
    return args.command not in ("run", "extract")


def _check_streams(args: argparse.Namespace, closed: set[int]) -> None:
    """Refuse to read an archive from, or write output to, a stream that was closed."""
    if 0 in closed and getattr(args, "archive", None) == "-":
        raise OSError(errno.EBADF, "standard input is closed: no archive to read")
    if 1 in closed and _writes_standard_output(args):
        raise OSError(errno.EBADF, "standard output is closed")


def main(argv: Sequence[str] | None = None) -> int:
    closed = _fill_closed_descriptors()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, trace_args = _split_trace_arguments(argv)
    args = parser.parse_args(argv)
    if args.command in ("create", "deps"):
        if trace_args is not None and not args.trace:
            parser.error(f"arguments after -- are for the traced run; {args.command} needs --trace")
        args.trace_args = trace_args or []
    if args.command == "run":
        args.args = _program_arguments(argv, args.archive, args.args)
    _setup_logging(args)
    failure = EXIT_RUN_FAILURE if args.command == "run" else EXIT_FAILURE
    from packer.errors import PackError
    from runner import RunError
    from unpacker import UnpackError

    # Like Ctrl-C, these end rpack through an exception, so every cleanup on the way out runs
    # (a half-unpacked root, a partial extraction, an unfinished archive). While a program
    # runs, the runner blocks them and relays them to the program instead.
    for terminating in TERMINATING:
        signal.signal(terminating, _terminate)
    try:
        _check_streams(args, closed)
        status = COMMANDS[args.command](args)
    except Terminated as e:
        if args.debug:
            raise
        _error(f"terminated by {signal.Signals(e.signum).name}")
        return _end_of(e.signum)
    except (PackError, UnpackError, RunError) as e:
        if args.debug:
            raise
        message = str(e)
        if isinstance(e, UnpackError) and e.of_archive:
            archive = getattr(args, "archive", "-")
            message = f"{'standard input' if archive == '-' else archive}: {message}"
        _error(message, getattr(e, "hint", None))
        return failure
    except KeyboardInterrupt:
        if args.debug:
            raise
        _error("interrupted")
        return _end_of(signal.SIGINT)
    except BrokenPipeError:
        # The reader went away (`rpack deps | head`): not worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return failure
    except OSError as e:
        if args.debug:
            raise
        _error(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        return failure
    # A program that a signal ended: rpack ends of the same signal, once it has cleaned up.
    ended_by = getattr(status, "signal", None)
    return _end_of(ended_by) if ended_by else int(status)


def _end_of(signum: int) -> int:
    """End rpack by signal `signum`, as a shell expects of a program that a signal ended: a
    loop running rpack stops on Ctrl-C, where an exit status of 130 would let it go on.
    Returns 128+signum should the signal not end it."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
