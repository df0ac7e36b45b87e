"""The output-path guard (jcompress.outputs) and atomic writes (jcompress.atomic): races,
kills between the swap's renames, stale temporaries, umask, a full disk."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jcompress import atomic
from jcompress.atomic import DestinationExists, atomic_dir, recover, write_json
from jcompress.errors import UserError
from jcompress.outputs import MARKER, check_output_dir, check_output_file, is_jcompress_output

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (the sentinel check)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def work(tmp_path):
    """A model-like input directory with a sentinel, a data file, and a jcompress output."""
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    (model / "SENTINEL").write_bytes(b"\x00precious\xff")
    data = tmp_path / "data.txt"
    data.write_text("some text\n")
    with atomic_dir(tmp_path / "prev") as d:
        (d / "report.json").write_text("{}")
    (tmp_path / "link").symlink_to(model)
    return tmp_path


def _inputs(w):
    return {"--model": w / "models" / "m", "--data": w / "data.txt"}


@pytest.mark.parametrize(
    "out, overwrite, needle",
    [
        ("models/m", True, "is the input --model"),
        ("link", True, "is the input --model"),  # a symlink to the input: same real path
        ("models", True, "contains the input --model"),
        (".", True, "contains the input --model"),
        ("models/m/config.json", True, "is part of the input --model"),
        ("data.txt", True, "is the input --data"),
        ("prev", False, "already exists (pass --overwrite"),
        ("foreign", True, "was not written by jcompress"),
        ("afile", True, "is a file; expected a directory"),
        ("afile/sub", False, "is a file, not a directory"),
    ],
)
def test_check_output_dir_refuses(work, out, overwrite, needle):
    (work / "foreign").mkdir()
    (work / "foreign" / "mine.txt").write_text("mine")
    (work / "afile").write_text("x")
    before = tree(work)
    with pytest.raises(UserError) as e:
        check_output_dir(work / out, inputs=_inputs(work), overwrite=overwrite, arg="--out")
    msg = str(e.value)
    assert msg.startswith("--out: ") and needle in msg and "\n" not in msg
    assert tree(work) == before


def test_check_output_dir_allows(work):
    ins = _inputs(work)
    (work / "empty").mkdir()
    for out in ("new", "prev", "empty", "models/m/new-subdir", "deep/er/new"):
        check_output_dir(work / out, inputs=ins, overwrite=True)
    assert is_jcompress_output(work / "prev") and (work / "prev" / MARKER).is_file()
    assert json.loads((work / "prev" / MARKER).read_text())["tool"] == "jcompress"


def test_check_output_dir_space_and_permissions(work):
    with pytest.raises(UserError, match="not enough free disk space"):
        check_output_dir(work / "new", need_bytes=1 << 62)
    if os.geteuid() != 0:
        ro = work / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(UserError, match="permission denied"):
                check_output_dir(ro / "out")
        finally:
            ro.chmod(0o700)


@pytest.mark.parametrize(
    "out, overwrite, needle",
    [
        ("models/m/config.json", True, "is part of the input --model"),
        ("data.txt", True, "is the input --data"),
        ("link/config.json", True, "is part of the input --model"),
        ("prev", True, "is a directory"),
        ("prev/report.json", False, "already exists"),
    ],
)
def test_check_output_file_refuses(work, out, overwrite, needle):
    before = tree(work)
    with pytest.raises(UserError) as e:
        check_output_file(work / out, inputs=_inputs(work), overwrite=overwrite, arg="--json")
    assert str(e.value).startswith("--json: ") and needle in str(e.value)
    assert tree(work) == before


def test_overwrite_replaces_only_files_of_jcompress_form(work):
    """--overwrite replaces a .json report (a JSON object) but not a notes file that happens
    to carry the name, and a caller's ``owner`` form decides for other files."""
    (work / "report.json").write_text('{"ppl": 1.0}')
    check_output_file(work / "report.json", overwrite=True, arg="--json")  # replaceable
    for name, text in (("notes.json", "my notes, not JSON"), ("list.json", "[1, 2]")):
        (work / name).write_text(text)
        with pytest.raises(UserError) as e:
            check_output_file(work / name, overwrite=True, arg="--json")
        assert str(e.value) == (
            f"--json: {work / name} exists and is not a JSON object (a jcompress report); "
            "--overwrite replaces only output of the form jcompress writes there (move or "
            "remove it yourself)"
        )
        assert (work / name).read_text() == text
    # a safetensors destination: the caller's form (metadata), read from the header only
    from safetensors.numpy import save_file

    from jcompress.outputs import safetensors_metadata

    save_file({"w": np.zeros(2, np.float32)}, str(work / "mine.safetensors"), {"format": "x/1"})
    save_file({"w": np.zeros(2, np.float32)}, str(work / "shard.safetensors"), {"format": "pt"})
    owner = (lambda p: safetensors_metadata(p, format="x/1"), "an x file")
    check_output_file(work / "mine.safetensors", overwrite=True, arg="--out", owner=owner)
    with pytest.raises(UserError, match=r"shard.safetensors exists and is not an x file"):
        check_output_file(work / "shard.safetensors", overwrite=True, arg="--out", owner=owner)
    assert not safetensors_metadata(work / "notes.json", format="x/1")  # not safetensors


# --------------------------------------------------------------------------- atomic_dir


def test_atomic_dir_refuses_a_destination_that_appeared(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(DestinationExists) as e:
        with atomic_dir(dest) as tmp:
            (tmp / "result").write_text("ours")
            dest.mkdir()  # another run finished first (an empty dir: plain rename would clobber)
            (dest / "theirs").write_text("theirs")
    assert (dest / "theirs").read_text() == "theirs" and not (dest / "result").exists()
    kept = e.value.kept
    assert kept is not None and str(kept) in str(e.value)
    assert (kept / "result").read_text() == "ours"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


_RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from jcompress.atomic import atomic_dir
    from jcompress.errors import UserError
    dest, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    try:
        with atomic_dir(dest) as tmp:
            (tmp / "who").write_text(me)
            (dest.parent / f"ready-{me}").touch()
            deadline = time.time() + 60
            while not (dest.parent / f"ready-{other}").exists() and time.time() < deadline:
                time.sleep(0.01)
    except UserError as e:
        print(f"ERR {e}")
        sys.exit(2)
    print("OK")
    """
)


def test_two_processes_racing_to_one_output(tmp_path):
    dest = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(dest), me, other],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for me, other in (("a", "b"), ("b", "a"))
    ]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    winner = next(r for r in results if r[2] == 0)
    loser = next(r for r in results if r[2] == 2)
    assert winner[0].strip() == "OK"
    msg = loser[0].strip()
    assert msg.startswith("ERR ") and "appeared while this run was writing" in msg
    kept = Path(msg.split("left at ")[1])
    assert kept.is_dir() and (kept / "who").read_text() != (dest / "who").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


_KILLED_SWAP = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from jcompress.atomic import atomic_dir
    real, calls = os.replace, []
    def replace(src, dst):
        calls.append(1)
        if len(calls) == 2:  # between "dest -> old" and "new -> dest": killed
            os._exit(9)
        return real(src, dst)
    os.replace = replace
    with atomic_dir(Path(sys.argv[1]), overwrite=True) as tmp:
        (tmp / "v").write_text("new")
    """
)


@pytest.mark.parametrize("resume", ["recover", "atomic_dir", "check_output_dir"])
def test_swap_killed_between_renames_is_completed_next_run(tmp_path, resume):
    dest = tmp_path / "out"
    with atomic_dir(dest) as d:
        (d / "v").write_text("old")
    r = subprocess.run([sys.executable, "-c", _KILLED_SWAP, str(dest)], cwd=REPO)
    assert r.returncode == 9
    assert not dest.exists()  # the kill left the destination missing ...
    assert (tmp_path / ".out.swap.json").is_file()  # ... and a journal that says how to fix it
    if resume == "recover":
        assert recover(dest)
        assert (dest / "v").read_text() == "new"  # rolled forward: the journal is the commit
    elif resume == "atomic_dir":
        with atomic_dir(dest, overwrite=True) as d:
            assert (dest / "v").read_text() == "new"
            (d / "v").write_text("newer")
        assert (dest / "v").read_text() == "newer"
    else:
        with pytest.raises(UserError, match="already exists"):
            check_output_dir(dest, overwrite=False)
        assert (dest / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_siblings_of_dead_runs_are_cleaned(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **_OUT)
    dead_pid = int(dead.stdout)
    dest = tmp_path / "out"
    stale = [tmp_path / f".out.tmp-{dead_pid}-abcd", tmp_path / f".out.old-{dead_pid}-ef01"]
    live = tmp_path / f".out.tmp-{os.getpid()}-0000"  # a run still going: left alone
    other = tmp_path / f".other.tmp-{dead_pid}-abcd"  # another output's: left alone
    for p in (*stale, live, other):
        p.mkdir()
        (p / "x").write_text("x")
    with atomic_dir(dest) as d:
        (d / "v").write_text("v")
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists()
    assert "removed" in capsys.readouterr().err


_OUT = {"capture_output": True, "text": True, "check": True}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_created_dirs_and_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as d:
            write_json(d / "r.json", {"a": 1})
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    for f in (tmp_path / "out" / "r.json", tmp_path / "x.json", tmp_path / "out" / MARKER):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_no_space_left_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / MARKER).write_text("{}")
    (tmp_path / "out" / "old").write_text("old")
    for overwrite, dest in ((False, tmp_path / "new"), (True, tmp_path / "out")):
        with pytest.raises(UserError) as e:
            with atomic_dir(dest, overwrite=overwrite, arg="--out") as d:
                (d / "part").write_text("half")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        assert str(e.value).startswith("--out: no space left on device")
    with pytest.raises(UserError, match="^--out: no space left on device"):
        with atomic_dir(tmp_path / "new", arg="--out"):  # as a library's own error type
            raise ValueError("tensorstore: write failed: No space left on device [errno 28]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "old").read_text() == "old"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.json, "dump", full)
    with pytest.raises(UserError, match="^--json: no space left on device"):
        write_json(tmp_path / "r.json", {"a": 1}, arg="--json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_json_without_overwrite_never_replaces(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("theirs")
    with pytest.raises(DestinationExists) as e:
        write_json(p, {"a": 1}, overwrite=False)
    assert p.read_text() == "theirs"
    assert json.loads(Path(e.value.kept).read_text()) == {"a": 1}
    write_json(tmp_path / "new.json", {"a": 1}, overwrite=False)
    assert json.loads((tmp_path / "new.json").read_text()) == {"a": 1}


def test_no_space_in_a_nested_writer_names_the_outer_output(tmp_path, monkeypatch):
    """eigen's --out holds save_hf's dense/ (its own atomic_dir): the user sees --out."""

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError) as e:
        with atomic_dir(tmp_path / "run", arg="--out") as d:
            (d / "report.md").write_text("done")
            with atomic_dir(d / "dense", arg="out_dir") as inner:
                monkeypatch.setattr(atomic.json, "dump", full)
                write_json(inner / "config.json", {})
    assert str(e.value).startswith("--out: no space left on device while writing ")
    assert str(tmp_path / "run") in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_losing_a_race_to_replace_keeps_the_result(tmp_path):
    """Two --overwrite runs of one output: the one that finds the other's swap in progress
    (a journal owned by a live process) keeps its finished result aside and says where."""
    dest = tmp_path / "out"
    with atomic_dir(dest) as d:
        (d / "v").write_text("old")
    with pytest.raises(DestinationExists) as e:
        with atomic_dir(dest, overwrite=True, arg="--out") as d:
            (d / "v").write_text("ours")
            journal = {"pid": os.getppid(), "old": str(tmp_path / "x"), "new": str(tmp_path / "y")}
            (tmp_path / ".out.swap.json").write_text(json.dumps(journal))
    assert str(e.value).startswith("--out: ") and str(e.value.kept) in str(e.value)
    assert (e.value.kept / "v").read_text() == "ours"
    assert (dest / "v").read_text() == "old"
    with pytest.raises(UserError, match="is replacing it right now"):
        check_output_dir(dest, overwrite=True)


def test_rename_noreplace_fallback_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", None)  # e.g. not Linux: the O_EXCL lock route
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "v").write_text("new")
    dst.mkdir()  # an empty dir: a plain rename would silently replace it
    with pytest.raises(FileExistsError):
        atomic.rename_noreplace(src, dst)
    dst.rmdir()
    atomic.rename_noreplace(src, dst)
    assert (dst / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # the lock file is gone


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_a_failed_write_leaves_no_folders_it_created(tmp_path, interrupt):
    """The parents a writer creates for its output go again when the work fails or is
    interrupted; a pre-existing folder, and one another writer filled meanwhile, stay."""
    base = tmp_path / "keep"
    base.mkdir()
    with pytest.raises(interrupt):
        with atomic_dir(base / "a" / "b" / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise interrupt()
    assert sorted(p.name for p in base.iterdir()) == []

    with pytest.raises(TypeError):  # not JSON-serialisable: fails while writing
        write_json(base / "c" / "d" / "r.json", {"x": object()})
    assert sorted(p.name for p in base.iterdir()) == []

    with pytest.raises(interrupt):
        with atomic_dir(base / "e" / "out"):
            (base / "e" / "other.txt").write_text("someone else's")
            raise interrupt()
    assert [p.name for p in (base / "e").iterdir()] == ["other.txt"]

    with atomic_dir(base / "f" / "g" / "out") as tmp:  # success keeps everything
        (tmp / "w.bin").write_bytes(b"y")
    assert (base / "f" / "g" / "out" / "w.bin").read_bytes() == b"y"
