"""The `rpack` command line: parses arguments, sets up logging, maps errors to exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from packer.pack import Options

logger = logging.getLogger("rpack")

EXIT_FAILURE = 1
EXIT_RUN_FAILURE = 125


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = {"WARNING": "warning", "ERROR": "error", "DEBUG": "debug"}.get(record.levelname)
        prefix = f"rpack: {level}: " if level else "rpack: "
        return prefix + record.getMessage()


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _common(parser: argparse.ArgumentParser, top: bool) -> None:
    # Accepted before and after the command; a subcommand's copy must not reset the top's.
    parser.add_argument("-q", "--quiet", action="store_true",
                        default=False if top else argparse.SUPPRESS, help="only errors")
    parser.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                        help="say more (twice: debug)")
    parser.add_argument("--debug", action="store_true",
                        default=False if top else argparse.SUPPRESS,
                        help="debug output and tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpack",
        description="Pack a Linux program with everything it needs into one root-filesystem "
                    "tar.zst, and run it anywhere.")
    parser.add_argument("--version", action="version", version=f"rpack {__version__}")
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    resolve = argparse.ArgumentParser(add_help=False)
    resolve.add_argument("--add", action="append", default=[], metavar="PATH",
                         help="also pack a file or a tree; ELF files in it get their libraries")
    resolve.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                         help="leave out paths matching GLOB")
    resolve.add_argument("--env", action="append", default=[], type=_key_value,
                         metavar="KEY=VALUE", help="run-time environment (stored in the archive; "
                         "LD_LIBRARY_PATH and LD_PRELOAD here take part in resolution)")
    resolve.add_argument("--allow-missing", action="store_true",
                         help="warn instead of failing on a library that cannot be found")

    create = commands.add_parser("create", parents=[resolve], help="pack programs",
                                 description="Pack PROGRAMs and what they need into ARCHIVE.")
    _common(create, top=False)
    create.add_argument("-f", "--force", action="store_true", help="overwrite ARCHIVE")
    create.add_argument("--entrypoint", metavar="PATH", help="the default program")
    create.add_argument("--workdir", default="/", metavar="DIR",
                        help="the default working directory")
    create.add_argument("-l", "--level", type=int, default=3, choices=range(1, 23),
                        metavar="LEVEL", help="zstd level, 1 to 22 (default 3)")
    create.add_argument("-T", "--threads", type=int, default=0,
                        help="zstd threads (default: all cores)")
    create.add_argument("archive", metavar="ARCHIVE", help="output file, or - for stdout")
    create.add_argument("programs", nargs="+", metavar="PROGRAM")

    deps = commands.add_parser("deps", parents=[resolve], help="show what create would pack",
                               description="Print what create would pack, and why.")
    _common(deps, top=False)
    deps.add_argument("--json", action="store_true", help="one JSON object")
    deps.add_argument("programs", nargs="+", metavar="PROGRAM")

    run = commands.add_parser("run", help="run a packed program",
                              description="Unpack ARCHIVE into a private root and run its "
                              "entrypoint there with ARGs.")
    _common(run, top=False)
    run.add_argument("--entrypoint", metavar="PATH", help="run another packed program")
    run.add_argument("--env", action="append", default=[], type=_key_value,
                     metavar="KEY=VALUE", help="set a variable for the program")
    run.add_argument("--workdir", metavar="DIR", help="working directory inside the root")
    run.add_argument("--keep", action="store_true", help="keep the root and say where it is")
    run.add_argument("--tmpdir", metavar="DIR",
                     help="where the temporary root goes (default: $TMPDIR or /tmp)")
    run.add_argument("archive", metavar="ARCHIVE", help="archive file, or - for stdin")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG")
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.INFO
    if args.quiet:
        level = logging.ERROR
    elif args.debug or args.verbose >= 2:
        level = logging.DEBUG
    elif args.verbose == 0:
        level = logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
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
                   workdir=getattr(args, "workdir", "/"), allow_missing=args.allow_missing)


def cmd_create(args: argparse.Namespace) -> int:
    from packer.archive import open_output
    from packer.pack import create

    with open_output(args.archive, args.force) as out:
        create(_options(args), out, args.level, args.threads)
    return 0


def cmd_deps(args: argparse.Namespace) -> int:
    from packer.pack import collect

    collection = collect(_options(args))
    report = collection.report()
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
        return 0
    for item in report["files"]:
        print(f"{item['kind']:<12} {item['path']}  ({item['why']})")
    for missing in report["missing"]:
        print(f"{'missing':<12} {missing['name']}  (needed by {missing['needed_by']})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from runner.launch import launch

    return launch(args.archive, args.args, entrypoint=args.entrypoint, env=dict(args.env),
                  workdir=args.workdir, tmpdir=args.tmpdir, keep=args.keep)


COMMANDS = {"create": cmd_create, "deps": cmd_deps, "run": cmd_run}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    failure = EXIT_RUN_FAILURE if args.command == "run" else EXIT_FAILURE
    from packer.errors import PackError
    from runner import RunError
    from unpacker import UnpackError

    try:
        return COMMANDS[args.command](args)
    except (PackError, UnpackError, RunError) as e:
        if args.debug:
            raise
        _error(str(e), getattr(e, "hint", None))
        return failure
    except KeyboardInterrupt:
        if args.debug:
            raise
        _error("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`rpack deps | head`): not worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return failure
    except OSError as e:
        if args.debug:
            raise
        _error(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        return failure


if __name__ == "__main__":
    sys.exit(main())
