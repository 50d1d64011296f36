"""Shebang scripts: the kernel's parsing (R80), the interpreters packed (R81), scripts run."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import archive_members, needs_root, rpack, run_cli

from packer import script
from packer.errors import PackError


def write_script(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    path.chmod(0o755)
    return path


def test_shebang_is_split_like_the_kernel(tmp_path: Path) -> None:
    cases = {
        "#!/bin/sh\n": ("/bin/sh", None),
        "#! \t/bin/sh -e\n": ("/bin/sh", "-e"),
        "#!/usr/bin/env python3 -I  \nprint()\n": ("/usr/bin/env", "python3 -I"),
        "#!/bin/sh\t-e -x\n": ("/bin/sh", "-e -x"),
        "#!/bin/sh": ("/bin/sh", None),
    }
    for text, expected in cases.items():
        shebang = script.read_shebang(str(write_script(tmp_path / "s", text)))
        assert shebang is not None and (shebang.interp, shebang.arg) == expected, text
    assert script.read_shebang(str(write_script(tmp_path / "s", "echo hi\n"))) is None


def test_env_takes_the_whole_argument_as_one_name_unless_split() -> None:
    assert script.env_name("python3") == "python3"
    assert script.env_name("python3 -I") == "python3 -I"
    assert script.env_name("-S python3 -I") == "python3"
    assert script.env_name("-S -i FOO=1 -u BAR perl -w") == "perl"
    assert script.env_name("-Spython3") == "python3"


def test_env_finds_the_name_through_the_roots_path(tmp_path: Path) -> None:
    hello = write_script(tmp_path / "hello", "#!/usr/bin/env python3\n")
    hops = script.interpreters(str(hello), "/usr/local/bin:/usr/bin:/bin")
    assert [h.path for h in hops] == ["/usr/bin/env", "/usr/bin/python3"]
    with pytest.raises(PackError, match="PATH"):
        script.interpreters(str(hello), "/nonexistent")
    spaced = write_script(tmp_path / "spaced", "#!/usr/bin/env python3 -I\n")
    with pytest.raises(PackError):
        script.interpreters(str(spaced), "/usr/bin")


def test_nested_interpreters_stop_at_four_levels(tmp_path: Path) -> None:
    previous = "/bin/sh"
    for level in range(5):
        previous = str(write_script(tmp_path / f"level{level}", f"#!{previous}\n"))
    hops = script.interpreters(str(tmp_path / "level3"), "/usr/bin")
    assert [h.path for h in hops] == [str(tmp_path / f"level{n}") for n in (2, 1, 0)] + \
        ["/bin/sh"]
    with pytest.raises(PackError, match="levels"):
        script.interpreters(str(tmp_path / "level4"), "/usr/bin")


def test_bad_interpreters_fail_clearly(tmp_path: Path) -> None:
    crlf = write_script(tmp_path / "crlf", "#!/bin/sh\r\necho\r\n")
    done = rpack("deps", "--json", crlf)
    assert done.returncode == 1 and "CRLF" in done.stderr
    relative = write_script(tmp_path / "relative", "#!bin/sh\n")
    done = rpack("deps", "--json", relative)
    assert done.returncode == 1 and "relative" in done.stderr


def test_deps_lists_the_interpreters_with_their_symlinks(tmp_path: Path) -> None:
    hello = write_script(tmp_path / "hello.py", "#!/usr/bin/env python3\nprint('hi')\n")
    done = rpack("deps", "--json", hello)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    files = {f["path"]: f for f in report["files"]}
    assert files[str(hello)]["kind"] == "program"
    for path in ("/usr/bin/env", "/usr/bin/python3"):
        assert files[path]["kind"] == "script-interpreter"
        assert str(hello) in files[path]["why"]
    assert any(f["kind"] == "library" and "libc.so" in f["path"] for f in report["files"])
    out = tmp_path / "hello.tar.zst"
    assert rpack("create", out, hello).returncode == 0
    members = archive_members(out)
    assert members["usr/bin/python3"].issym()    # python3 -> python3.11 is kept


@pytest.fixture(scope="module")
def scripts() -> Iterator[dict[str, Path]]:
    # Not under tmp_path: nobody must reach the archives.
    where = Path(tempfile.mkdtemp(prefix="rpack-script-test-"))
    where.chmod(0o755)
    made = {
        "py": write_script(where / "hello.py", "#!/usr/bin/env python3\nimport json, sys\n"
                           "print(json.dumps(sys.argv[1:]))\n"),
        "sh": write_script(where / "hello.sh", "#!/bin/sh -e\necho \"sh: $1\"\nfalse\n"
                           "echo not reached\n"),
    }
    archives = {}
    for name, path in made.items():
        archives[name] = where / f"{name}.tar.zst"
        done = rpack("create", archives[name], path)
        assert done.returncode == 0, done.stderr
        archives[name].chmod(0o644)
    archives["which"] = where / "which.tar.zst"
    assert rpack("create", archives["which"], "/usr/bin/which").returncode == 0
    archives["which"].chmod(0o644)
    yield archives
    shutil.rmtree(where)




@needs_root
@pytest.mark.parametrize("mode", ["root", "nobody"])
def test_scripts_run_in_their_root(scripts: dict[str, Path], mode: str) -> None:
    done = run_cli(mode, "run", scripts["py"], "a", "b c")
    assert (done.returncode, done.stdout) == (0, '["a", "b c"]\n'), done.stderr
    done = run_cli(mode, "run", scripts["sh"], "x")
    # -e from the #! line stops the script at `false`.
    assert (done.returncode, done.stdout) == (1, "sh: x\n"), done.stderr
    # peers.md section 3, scenario 5: a shell script program (which) brings its shell.
    done = run_cli(mode, "run", scripts["which"], "sh")
    assert done.returncode == 0 and done.stdout.strip().endswith("/sh"), done.stderr

