"""rpack create and rpack deps through the command line, checked against the format contract."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import zstandard
from conftest import RPACK, error_lines, rpack, rpack_env
from hypothesis import given, settings
from hypothesis import strategies as st

from packer import archive


def members(archive: Path) -> list[tarfile.TarInfo]:
    with open(archive, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            return list(tar)


def manifest(archive: Path) -> dict[str, object]:
    with open(archive, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            first = tar.next()
            assert first is not None and first.name == ".rpack/manifest.json"
            data = tar.extractfile(first)
            assert data is not None
            result: dict[str, object] = json.loads(data.read())
            return result


@pytest.fixture(scope="module")
def sh_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sh") / "sh.tar.zst"
    done = rpack("create", str(out), "/bin/sh")
    assert done.returncode == 0, done.stderr
    return out


def test_layout_follows_the_format(sh_archive: Path) -> None:
    infos = members(sh_archive)
    assert infos[0].name == ".rpack/manifest.json"
    names = [i.name for i in infos[1:]]
    assert names == sorted(names, key=lambda n: n.encode())
    by_name = {i.name: i for i in infos}
    assert all(i.uid == 0 and i.gid == 0 and i.uname == "" and i.gname == "" for i in infos)
    assert all(isinstance(i.mtime, int) for i in infos)
    assert not any(i.pax_headers for i in infos)
    # Merged /usr: directory links kept, the program's own link kept, libraries dereferenced.
    assert by_name["bin"].issym() and by_name["bin"].linkname == "usr/bin"
    assert by_name["lib64"].issym()
    real_sh = os.path.realpath("/bin/sh")
    if real_sh != "/usr/bin/sh":
        assert by_name["usr/bin/sh"].issym()
        assert by_name["usr" + real_sh.removeprefix("/usr")].isreg()
    interp = by_name["usr/lib64/ld-linux-x86-64.so.2"]
    assert interp.isreg() or interp.islnk()
    assert by_name["etc/ld.so.cache"].isreg()
    assert by_name["tmp"].isdir() and by_name["tmp"].mode == 0o1777
    assert by_name["proc"].isdir() and by_name["dev"].isdir()
    for info in infos:
        if info.islnk():
            target = by_name[info.linkname]
            assert target.isreg() and names.index(info.linkname) < names.index(info.name)


def test_manifest_lists_every_member(sh_archive: Path) -> None:
    data = manifest(sh_archive)
    assert data["format"] == "rpack/1"
    assert data["entrypoint"] == ["/bin/sh"]
    platform = data["platform"]
    assert isinstance(platform, dict)
    assert platform["machine"] == os.uname().machine
    assert platform["libc"] == "glibc" and platform["elf_class"] == 64
    assert platform["min_kernel"] and platform["libc_version"]
    entries = data["entries"]
    assert isinstance(entries, list)
    assert [e["path"] for e in entries] == [i.name for i in members(sh_archive)[1:]]
    assert data["totals"] == {"entries": len(entries),
                              "bytes": sum(e.get("size", 0) for e in entries)}


def test_zstd_frames_carry_checksums(sh_archive: Path) -> None:
    done = subprocess.run(["zstd", "-lv", str(sh_archive)], capture_output=True, text=True)
    assert "XXH64" in done.stdout
    assert subprocess.run(["zstd", "-tq", str(sh_archive)]).returncode == 0


def test_same_create_twice_is_byte_identical(tmp_path: Path) -> None:
    epoch = "1600000000"
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.tar.zst"
        done = rpack("create", str(out), "/bin/sh", env={"SOURCE_DATE_EPOCH": epoch})
        assert done.returncode == 0, done.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert all(i.mtime <= int(epoch) for i in members(tmp_path / "a.tar.zst"))
    plain = [tmp_path / "c.tar.zst", tmp_path / "d.tar.zst"]
    for out in plain:
        assert rpack("create", str(out), "/bin/sh").returncode == 0
    assert plain[0].read_bytes() == plain[1].read_bytes()


@pytest.mark.root
def test_archive_runs_under_plain_chroot(sh_archive: Path, tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", str(sh_archive), "-C", str(root)], check=True)
    done = subprocess.run(["chroot", str(root), "/bin/sh", "-c", "echo ok"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


def test_existing_output_is_refused_without_force(tmp_path: Path) -> None:
    out = tmp_path / "x.tar.zst"
    out.write_text("precious")
    done = rpack("create", str(out), "/bin/sh")
    assert done.returncode == 1
    assert "already exists" in done.stderr and "Traceback" not in done.stderr
    assert out.read_text() == "precious"
    assert rpack("create", "-f", str(out), "/bin/sh").returncode == 0
    assert out.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tar.zst"]


def test_stdout_archive_streams_and_refuses_a_terminal(tmp_path: Path) -> None:
    env = rpack_env()
    produced = subprocess.run([*RPACK, "create", "-", "/bin/sh"], capture_output=True, env=env)
    assert produced.returncode == 0
    checked = subprocess.run(["zstd", "-tq"], input=produced.stdout)
    assert checked.returncode == 0
    controller, terminal = os.openpty()
    try:
        refused = subprocess.run([*RPACK, "create", "-", "/bin/sh"], stdout=terminal,
                                 stderr=subprocess.PIPE, env=env, text=True)
    finally:
        os.close(controller)
        os.close(terminal)
    assert refused.returncode == 1
    assert "terminal" in refused.stderr


def test_missing_library_fails_naming_it_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "gone.c").write_text("int gone(void) { return 1; }\n")
    (tmp_path / "main.c").write_text("int gone(void);\nint main(void) { return gone(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "libgone.so.1"),
                    "-Wl,-soname,libgone.so.1", str(tmp_path / "gone.c")], check=True)
    subprocess.run(["gcc", "-o", str(tmp_path / "prog"), str(tmp_path / "main.c"),
                    "-Wl,--no-as-needed", str(tmp_path / "libgone.so.1"),
                    f"-Wl,-rpath,{tmp_path}"], check=True)
    (tmp_path / "libgone.so.1").unlink()
    out = tmp_path / "out" / "prog.tar.zst"
    out.parent.mkdir()
    done = rpack("create", str(out), str(tmp_path / "prog"))
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[0].startswith("rpack: error: ")
    assert "libgone.so.1" in lines[0] and str(tmp_path / "prog") in lines[0]
    assert list(out.parent.iterdir()) == []
    deps = rpack("deps", "--json", str(tmp_path / "prog"))
    assert deps.returncode == 1 and "libgone.so.1" in deps.stderr
    assert error_lines(deps.stderr) == [lines[0]]
    failed = json.loads(deps.stdout)
    assert set(failed) == {"programs", "interpreter", "files", "missing"}
    assert failed["missing"] == [{"name": "libgone.so.1", "needed_by": str(tmp_path / "prog")}]
    assert any(f["path"].endswith("/libc.so.6") for f in failed["files"])
    allowed = rpack("deps", "--json", "--allow-missing", str(tmp_path / "prog"))
    assert allowed.returncode == 0
    report = json.loads(allowed.stdout)
    assert report["missing"] == [{"name": "libgone.so.1", "needed_by": str(tmp_path / "prog")}]


@pytest.mark.parametrize("bad", ["/etc/hostname", "/nonexistent/prog", "/usr"])
def test_bad_program_is_one_clear_error(bad: str, tmp_path: Path) -> None:
    done = rpack("create", str(tmp_path / "x.tar.zst"), bad)
    assert done.returncode == 1
    assert done.stderr.startswith("rpack: error: ") and "Traceback" not in done.stderr
    assert bad in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "named", "what"), [
    (["/proc/self/exe"], "/proc/self/exe", "in /proc, which the kernel provides, not a file to "
     "pack as a program"),
    (["/dev/stdin"], "/dev/stdin", "in /dev, which the kernel provides, not a file to pack as "
     "a program"),
    (["--add", "/sys/kernel", "/bin/sh"], "/sys/kernel", "in /sys, which the kernel provides, "
     "not a file to pack with --add"),
])
def test_kernel_files_are_not_packed(args: list[str], named: str, what: str,
                                     tmp_path: Path) -> None:
    # /proc/self/exe would pack rpack's own interpreter and a /proc of the packing host.
    done = rpack("create", tmp_path / "x.tar.zst", *args)
    assert done.returncode == 1
    assert error_lines(done.stderr) == [f"rpack: error: {named!r} is {what}"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["/proc/self/exe", "/proc/self/root/bin/sh"])
def test_a_link_into_proc_is_not_followed_there(target: str, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(target)
    done = rpack("create", tmp_path / "x.tar.zst", tmp_path / "link")
    assert error_lines(done.stderr) == [
        f"rpack: error: {str(tmp_path / 'link')!r} leads into /proc, which the kernel provides, "
        "not a file to pack as a program"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_deps_json_has_the_documented_shape() -> None:
    done = rpack("deps", "--json", "/bin/sh")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"programs", "interpreter", "files", "missing"}
    assert report["programs"] == ["/bin/sh"]
    assert report["interpreter"] == "/lib64/ld-linux-x86-64.so.2"
    kinds = {f["kind"] for f in report["files"]}
    assert {"program", "interpreter", "library", "generated"} <= kinds
    for item in report["files"]:
        assert set(item) == {"path", "source", "kind", "why"}
        assert item["path"].startswith("/")


def test_added_tree_brings_its_elf_libraries(tmp_path: Path) -> None:
    done = rpack("deps", "--json", "--add", "/usr/lib/python3.11/lib-dynload",
                 "/usr/bin/python3")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    paths = {f["path"]: f for f in report["files"]}
    ssl = [p for p in paths if "_ssl.cpython" in p]
    assert ssl and paths[ssl[0]]["kind"] == "added"
    assert any("libssl.so" in p for p in paths)


def test_exclude_leaves_a_file_out_of_plan_and_report(tmp_path: Path) -> None:
    glob = "/lib/x86_64-linux-gnu/libc.so.6"
    report = json.loads(rpack("deps", "--json", "--exclude", glob, "/bin/sh").stdout)
    assert glob not in {f["path"] for f in report["files"]}
    out = tmp_path / "x.tar.zst"
    assert rpack("create", "--exclude", glob, str(out), "/bin/sh").returncode == 0
    assert "usr/lib/x86_64-linux-gnu/libc.so.6" not in {i.name for i in members(out)}


@pytest.fixture(scope="module")
def static_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A static (ET_EXEC) and a static-pie (ET_DYN, no PT_INTERP) build of one program."""
    where = tmp_path_factory.mktemp("static")
    source = where / "hello.c"
    source.write_text('#include <stdio.h>\nint main(void) { puts("static hello"); return 0; }\n')
    built = {}
    for kind in ("static", "static-pie"):
        built[kind] = where / kind
        subprocess.run(["gcc", f"-{kind}", "-o", str(built[kind]), str(source)], check=True)
    return built


@pytest.mark.parametrize("kind", ["static", "static-pie"])
def test_static_programs_need_no_loader(static_programs: dict[str, Path], kind: str) -> None:
    report = json.loads(rpack("deps", "--json", str(static_programs[kind])).stdout)
    assert report["interpreter"] is None
    assert [f["kind"] for f in report["files"]] == ["program"]
    assert report["missing"] == []


@pytest.mark.root
@pytest.mark.parametrize("kind", ["static", "static-pie"])
def test_static_programs_run_in_their_root(static_programs: dict[str, Path], kind: str,
                                           tmp_path: Path) -> None:
    out = tmp_path / "s.tar.zst"
    assert rpack("create", str(out), str(static_programs[kind])).returncode == 0
    assert manifest(out)["platform"]["libc"] == "none"  # type: ignore[index]
    done = rpack("run", str(out))
    assert (done.returncode, done.stdout) == (0, "static hello\n"), done.stderr


@pytest.mark.root
def test_entrypoint_chooses_among_packed_programs(tmp_path: Path) -> None:
    out = tmp_path / "two.tar.zst"
    created = rpack("create", "--entrypoint", "/bin/echo", str(out), "/bin/sh", "/bin/echo")
    assert created.returncode == 0, created.stderr
    assert manifest(out)["entrypoint"] == ["/bin/echo"]
    assert rpack("run", str(out), "from", "echo").stdout == "from echo\n"
    done = rpack("run", "--entrypoint", "/bin/sh", str(out), "-c", "echo from sh")
    assert done.stdout == "from sh\n"


def test_create_refuses_to_replace_what_is_not_an_archive(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = rpack("create", "-f", str(fifo), "/bin/sh")
    assert done.returncode == 1 and "not a regular file" in done.stderr
    assert fifo.is_fifo()
    program = rpack("create", str(tmp_path / "x.tar.zst"), str(fifo))
    assert program.returncode == 1 and "not a regular file" in program.stderr


@pytest.mark.parametrize("name", [b"bad\xffname", b"bad\x01name"])
def test_names_the_reader_would_refuse_are_refused_at_create(tmp_path: Path,
                                                             name: bytes) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    with open(os.fsencode(tree) + b"/" + name, "w"):
        pass
    done = rpack("create", "--add", str(tree), str(tmp_path / "x.tar.zst"), "/bin/sh")
    assert done.returncode == 1
    assert done.stderr.startswith("rpack: error: cannot pack") and "Traceback" not in done.stderr
    assert "--exclude" in done.stderr
    assert not (tmp_path / "x.tar.zst").exists()


@pytest.mark.parametrize(("option", "message"), [
    (["--entrypoint", "/not/packed"], "not in the archive"),
    (["--workdir", "relative"], "not an absolute path"),
    (["--workdir", "/nonexistent"], "--workdir '/nonexistent' is not a directory in the archive"),
    (["--workdir", "/bin/sh"], "--workdir '/bin/sh' is not a directory in the archive"),
    (["--exclude", "*"], "--exclude leaves out the entrypoint /bin/sh"),
    (["--exclude", "/usr/bin/d*", "--entrypoint", "/bin/dash"],
     "--exclude leaves out the entrypoint /bin/dash"),
])
def test_defaults_that_could_not_run_are_refused(tmp_path: Path, option: list[str],
                                                 message: str) -> None:
    done = rpack("create", *option, str(tmp_path / "x.tar.zst"), "/bin/sh", "/bin/dash")
    assert done.returncode == 1 and message in done.stderr
    assert len(error_lines(done.stderr)) == 1 and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workdir", ["/", "/tmp", "/usr/bin", "/bin"])
def test_a_workdir_the_root_holds_is_accepted(tmp_path: Path, workdir: str) -> None:
    done = rpack("create", "--workdir", workdir, str(tmp_path / "x.tar.zst"), "/bin/sh")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("glob", "left_out", "role"), [
    ("/lib64/ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2", "the loader of /bin/sh"),
    ("*/libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6", "needed at start-up by /bin/sh"),
])
def test_excluding_what_the_loader_maps_at_start_up_is_warned(tmp_path: Path, glob: str,
                                                              left_out: str, role: str) -> None:
    done = rpack("create", "--exclude", glob, str(tmp_path / "x.tar.zst"), "/bin/sh")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("rpack: warning:")]
    assert len(warnings) == 1
    assert f"--exclude leaves out {left_out}, {role}" in warnings[0]


@pytest.mark.parametrize("epoch", ["abc", "-5", "99999999999999999999"])
def test_bad_source_date_epoch_is_refused(tmp_path: Path, epoch: str) -> None:
    done = rpack("create", str(tmp_path / "x.tar.zst"), "/bin/sh",
                 env={"SOURCE_DATE_EPOCH": epoch})
    assert done.returncode == 1 and "SOURCE_DATE_EPOCH" in done.stderr


def test_usage_errors_are_one_line_and_exit_2() -> None:
    done = rpack("create", "--env", "NOEQUALS", "x.tar.zst", "/bin/sh")
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith("rpack: error: ")
    assert all(line.startswith("rpack: ") for line in done.stderr.splitlines())


def test_added_modules_count_a_packed_soname_as_loaded(tmp_path: Path) -> None:
    # Like a JDK: lib/libjava.so needs libjvm.so, which sits in lib/server/ on no search path
    # and is loaded by path before libjava.so at run time (loader.md R11).
    tree = tmp_path / "jdk"
    (tree / "lib" / "server").mkdir(parents=True)
    (tmp_path / "a.c").write_text("int a(void) { return 1; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tree / "lib/server/libjvm.so"),
                    "-Wl,-soname,libjvm.so", str(tmp_path / "a.c")], check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tree / "lib/libjava.so"),
                    str(tmp_path / "a.c"), "-Wl,--no-as-needed",
                    str(tree / "lib/server/libjvm.so"), "-Wl,-rpath,$ORIGIN"], check=True)
    done = rpack("deps", "--json", "--add", str(tree), "/bin/sh")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["missing"] == []


@pytest.mark.root
def test_library_path_given_with_env_works_without_it(tmp_path: Path) -> None:
    # format.md section 3: the loader finds every packed library with no variable set.
    (tmp_path / "llp").mkdir()
    (tmp_path / "l.c").write_text("int l(void) { return 0; }\n")
    (tmp_path / "m.c").write_text("int l(void);\nint main(void) { return l(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "llp/libl.so.1"),
                    "-Wl,-soname,libl.so.1", str(tmp_path / "l.c")], check=True)
    subprocess.run(["gcc", "-o", str(tmp_path / "prog"), str(tmp_path / "m.c"),
                    "-Wl,--no-as-needed", str(tmp_path / "llp/libl.so.1")], check=True)
    out = tmp_path / "p.tar.zst"
    created = rpack("create", "--env", f"LD_LIBRARY_PATH={tmp_path}/llp", str(out),
                    str(tmp_path / "prog"))
    assert created.returncode == 0, created.stderr
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", str(out), "-C", str(root)], check=True)
    done = subprocess.run(["chroot", str(root), str(tmp_path / "prog")], capture_output=True,
                          text=True, env={"PATH": "/usr/sbin:/usr/bin"})
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def evil_interp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A program whose PT_INTERP is a static program in /tmp that leaves a marker when run."""
    where = tmp_path_factory.mktemp("evil")
    marker = where / "marker"
    (where / "evilld.c").write_text(
        '#include <stdio.h>\nint main(void) {\n'
        f'  FILE *f = fopen("{marker}", "a"); if (f) {{ fputs("ran\\n", f); fclose(f); }}\n'
        '  return 0;\n}\n')
    (where / "hello.c").write_text('int main(void) { return 0; }\n')
    subprocess.run(["gcc", "-static", "-o", str(where / "evilld"), str(where / "evilld.c")],
                   check=True)
    subprocess.run(["gcc", "-o", str(where / "evil2"), str(where / "hello.c"),
                    f"-Wl,--dynamic-linker={where / 'evilld'}"], check=True)
    return where / "evil2", marker


def test_an_untrusted_interpreter_is_never_run(evil_interp: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    program, marker = evil_interp
    deps = rpack("deps", "--json", str(program))
    assert not marker.exists()
    assert deps.returncode == 0, deps.stderr
    warning = [line for line in deps.stderr.splitlines() if line.startswith("rpack: warning:")]
    assert len(warning) == 1 and f"{program.parent / 'evilld'}" in warning[0]
    assert "writable" in warning[0] or "not owned by root" in warning[0]
    report = json.loads(deps.stdout)
    assert report["interpreter"] == str(program.parent / "evilld")
    # The host's trusted loader stood in for the model: libc is found as it would be.
    assert any(f["path"].endswith("/libc.so.6") for f in report["files"])
    out = tmp_path / "evil.tar.zst"
    done = rpack("create", str(out), str(program))
    assert not marker.exists()
    assert done.returncode == 0, done.stderr
    assert out.exists()


def test_a_root_owned_program_as_interpreter_is_not_run(tmp_path: Path) -> None:
    (tmp_path / "hello.c").write_text("int main(void) { return 0; }\n")
    subprocess.run(["gcc", "-o", str(tmp_path / "prog"), str(tmp_path / "hello.c"),
                    "-Wl,--dynamic-linker=/usr/bin/true"], check=True)
    deps = rpack("deps", str(tmp_path / "prog"))
    assert deps.returncode == 0, deps.stderr
    assert "'/usr/bin/true'" in deps.stderr and "it is not a dynamic loader" in deps.stderr


def _output_fd(pid: int, directory: Path) -> Path | None:
    """The descriptor through which process `pid` writes into `directory`, once it has data."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(f"{directory}/") and fd.stat().st_size > 0:
                return fd
        except OSError:
            continue
    return None


def test_a_killed_create_leaves_nothing_behind(tmp_path: Path) -> None:
    big = tmp_path / "in" / "big"
    big.parent.mkdir()
    with open(big, "wb") as f:
        for _ in range(32):
            f.write(os.urandom(1 << 20))
    out = tmp_path / "out"
    out.mkdir()
    # Level 19 on random data is slow enough to be caught with output half-written.
    proc = subprocess.Popen([*RPACK, "create", "-l", "19", "-T", "1", "--add", str(big),
                             str(out / "big.tar.zst"), "/bin/sh"],
                            env=rpack_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and _output_fd(proc.pid, out) is None:
            time.sleep(0.01)
        assert proc.poll() is None, "create finished before it could be killed"
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9
    assert list(out.iterdir()) == []


def test_symlinks_in_an_added_tree_are_kept_not_followed(tmp_path: Path) -> None:
    tree = tmp_path / "p"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "a").write_text("a\n")
    (tree / "src" / "ls").write_bytes(Path("/usr/bin/ls").read_bytes())
    links = {"conf": "../" * 12 + "etc", "root": "/", "alink": "src/a", "host": "/etc/hostname",
             "dirlink": "src", "bin": "/usr/bin"}
    for name, target in links.items():
        (tree / name).symlink_to(target)
    (tmp_path / "plink").symlink_to("p")
    deps = rpack("deps", "--json", "--add", str(tmp_path / "plink"), "/bin/sh")
    assert deps.returncode == 0, deps.stderr
    files = {f["path"]: f for f in json.loads(deps.stdout)["files"]}
    for name in links:
        assert files[str(tree / name)]["kind"] == "added"
    assert files[str(tmp_path / "plink")]["kind"] == "added"
    assert files[str(tree / "src" / "ls")]["kind"] == "added"
    # The ELF file of the tree still gets its libraries; nothing is packed through a link.
    assert any("libselinux.so" in path for path in files)
    assert not any(p.startswith(("/etc/shadow", "/proc", "/usr/bin/ls")) for p in files)
    out = tmp_path / "p.tar.zst"
    done = rpack("create", "--add", str(tmp_path / "plink"), str(out), "/bin/sh")
    assert done.returncode == 0, done.stderr
    by_name = {m.name: m for m in members(out)}
    inside = str(tree).lstrip("/")
    for name, target in links.items():
        member = by_name[f"{inside}/{name}"]
        assert member.issym() and member.linkname == target
    assert by_name[str(tmp_path / "plink").lstrip("/")].linkname == "p"
    assert by_name[f"{inside}/src/a"].isfile()
    assert "etc/shadow" not in by_name and "usr/bin/ls" not in by_name


def with_closed(fd: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """rpack ARGS started with descriptor `fd` (0 or 1) closed, its stderr captured."""
    pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
    del pipes["stdin" if fd == 0 else "stdout"]
    return subprocess.run([*RPACK, *map(str, args)], **pipes, stderr=subprocess.PIPE,
                          text=True, env=rpack_env(), timeout=120,
                          preexec_fn=lambda: os.close(fd))


@pytest.mark.parametrize(("fd", "args", "message"), [
    (1, ("create", "-", "/bin/sh"), "standard output is closed"),
    (1, ("deps", "/bin/sh"), "standard output is closed"),
    (0, ("list", "-"), "standard input is closed: no archive to read"),
])
def test_a_closed_standard_stream_is_one_error(fd: int, args: tuple[str, ...],
                                               message: str) -> None:
    done = with_closed(fd, *args)
    assert (done.returncode, done.stderr) == (1, f"rpack: error: {message}\n")


NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                max_size=120)


@settings(max_examples=2000, deadline=None)
@given(name=NAMES, kind=st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                                         tarfile.LNKTYPE]),
       mode=st.integers(0, 0o7777), mtime=st.integers(0, 8**11 + 10),
       size=st.integers(0, 8**11 + 10), linkname=NAMES)
def test_ustar_headers_are_what_tarfile_writes(name: str, kind: bytes, mode: int, mtime: int,
                                               size: int, linkname: str) -> None:
    info = archive.tarinfo(name, kind, mode, mtime, size if kind == tarfile.REGTYPE else 0,
                           linkname if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else "")
    fast = archive.ustar_header(info)
    if fast is not None:
        assert fast == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    else:
        assert info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")[156:157] == b"x"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(NAMES, NAMES | st.integers() | st.lists(NAMES), max_size=4),
                max_size=5),
       st.dictionaries(NAMES, NAMES, max_size=3))
def test_the_manifest_is_json_of_sorted_keys_an_entry_a_line(entries: list[dict[str, object]],
                                                             env: dict[str, str]) -> None:
    manifest = {"format": "rpack/1", "entries": entries, "env": env, "workdir": "/"}
    text = archive.manifest_bytes(manifest).decode()
    assert json.loads(text) == manifest
    # The keys in order at every level, and no entry spread over lines.
    assert list(json.loads(text, object_pairs_hook=lambda pairs: [k for k, _ in pairs])) == \
        sorted(manifest)
    lines = text.split("\n")
    for index, entry in enumerate(entries):
        line = "  " + json.dumps(entry, sort_keys=True, ensure_ascii=False)
        assert line + ("," if index < len(entries) - 1 else "") in lines
