"""tfb_core.artifacts: one rule for every output directory, and nothing of the user's is lost.

Most cases run the rule itself (quick); a few run the real commands: ``tfb bayesianize`` in
this process and as a subprocess (``--out .``), ``tfb finetune``, ``tfb eval --json``; ``tfb
serve --posterior-out`` is in tests/test_server_cli.py. Every case checks the user's files byte
for byte afterwards and that no temporary or set-aside directory is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tfb_core.artifacts import (OUTPUTS, TFB_CONFIG_NAME, check_output_dir, tfb_output, write_output_dir,
                                write_output_file)
from tfb_core.cli import main
from tfb_core.errors import TFBError

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) -> the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def hidden(root: Path) -> list[str]:
    """Temporary or set-aside entries (``.name.tmp.*``, ``.name.old.*``) anywhere under ``root``."""
    return [str(p.relative_to(root)) for p in root.rglob(".*")]


def write_posterior(sigma: float):
    """A ``write(tmp)`` that makes a (fake) Bayesianized adapter: the files tfb writes."""
    def write(tmp: Path) -> None:
        for name in ("adapter_config.json", "adapter_model.safetensors", "tfb_posterior.safetensors"):
            (tmp / name).write_text(name)
        (tmp / TFB_CONFIG_NAME).write_text(json.dumps({"sigma": sigma}))
    return write


def sigma_of(directory: Path) -> float:
    return json.loads((directory / TFB_CONFIG_NAME).read_text())["sigma"]


@pytest.fixture()
def user_dir(tmp_path):
    """A user's data folder: five files, one of them in a subfolder."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for name in ("cal.jsonl", "test.jsonl", "notes.txt", "sub/more.jsonl", "adapter_config.json"):
        (data / name).write_text(f"the user's {name}\n")
    return data


# --- the rule, case by case -------------------------------------------------------------------------


def test_a_new_directory_is_written_atomically_and_its_parents_made(tmp_path):
    out = tmp_path / "a" / "b" / "post"
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert tmp.parent == out.parent and not out.exists()  # beside it, renamed at the end
        write_posterior(0.1)(tmp)

    assert write_output_dir(out, write) == out
    assert sigma_of(out) == 0.1 and not seen[0].exists() and hidden(tmp_path) == []
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's private 0o700


def test_an_empty_directory_is_written(tmp_path):
    out = tmp_path / "post"
    out.mkdir()
    write_output_dir(out, write_posterior(0.1))
    assert sigma_of(out) == 0.1 and hidden(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_a_user_directory_is_refused_with_or_without_force(user_dir, force):
    before = snapshot(user_dir)
    with pytest.raises(TFBError) as e:
        write_output_dir(user_dir, write_posterior(0.1), force=force, flag="--out")
    message = str(e.value)
    assert message.startswith(f"--out {user_dir} is not empty") and "--force" in message
    assert "\n" not in message
    assert snapshot(user_dir) == before and hidden(user_dir.parent) == []


def test_a_previous_output_is_refused_without_force_and_replaced_with_it(tmp_path):
    out = tmp_path / "post"
    write_output_dir(out, write_posterior(0.1))
    before = snapshot(out)
    with pytest.raises(TFBError, match=f"--out {out} already holds a Bayesianized adapter: pass --force"):
        write_output_dir(out, write_posterior(0.2), flag="--out")
    assert snapshot(out) == before
    write_output_dir(out, write_posterior(0.2), force=True)
    assert sigma_of(out) == 0.2 and hidden(tmp_path) == []


def test_a_previous_finetune_output_is_one_too(tmp_path):
    out = tmp_path / "ad"
    out.mkdir()
    for name in OUTPUTS["finetuned adapter"][1]:
        (out / name).write_text("old")
    assert tfb_output(out) == "finetuned adapter"
    with pytest.raises(TFBError, match="already holds a finetuned adapter"):
        check_output_dir(out)
    write_output_dir(out, write_posterior(0.3), force=True)
    assert sigma_of(out) == 0.3 and not (out / "finetune.json").exists()


@pytest.mark.parametrize("extra", ["notes.txt", "sub/", "link"])
def test_a_previous_output_with_anything_else_in_it_is_never_replaced(tmp_path, extra):
    out = tmp_path / "post"
    write_output_dir(out, write_posterior(0.1))
    if extra == "sub/":
        (out / "sub").mkdir()
    elif extra == "link":
        (out / "adapter_model.safetensors").unlink()
        (out / "adapter_model.safetensors").symlink_to(tmp_path / "elsewhere")
    else:
        (out / extra).write_text("mine")
    before = snapshot(out)
    with pytest.raises(TFBError, match="holds files no tfb command writes"):
        write_output_dir(out, write_posterior(0.2), force=True)
    assert snapshot(out) == before and hidden(tmp_path) == []


def test_an_input_is_never_written_over_even_with_force(tmp_path, user_dir):
    adapter = tmp_path / "post"
    write_output_dir(adapter, write_posterior(0.1))  # a previous tfb output, and the input
    before = snapshot(tmp_path)
    for out, inputs, what in ((adapter, [("--adapter", adapter)], "is the input --adapter"),
                              (user_dir, [("--calibration", user_dir / "cal.jsonl")], "contains the input --calibration"),
                              (tmp_path, [("--adapter", adapter)], "contains the input --adapter")):
        with pytest.raises(TFBError, match=f"--out {out} {what} .*even with --force"):
            write_output_dir(out, write_posterior(0.2), force=True, inputs=inputs, flag="--out")
    assert snapshot(tmp_path) == before and hidden(tmp_path) == []


def test_the_current_directory_is_never_replaced(tmp_path, monkeypatch):
    here = tmp_path / "work"
    write_output_dir(here, write_posterior(0.1))  # even a previous output
    (here / "inner").mkdir()  # (then also a directory holding more)
    monkeypatch.chdir(here)
    before = snapshot(tmp_path)
    with pytest.raises(TFBError, match=r"--out \. is the current directory: .*even with --force"):
        write_output_dir(".", write_posterior(0.2), force=True, flag="--out")
    monkeypatch.chdir(here / "inner")
    with pytest.raises(TFBError, match=r"--out \.\. contains the current directory"):
        write_output_dir("..", write_posterior(0.2), force=True, flag="--out")
    (here / "inner").rmdir()
    monkeypatch.chdir(here)
    for f in list(here.iterdir()):
        f.unlink()
    with pytest.raises(TFBError, match="is the current directory"):  # empty: still refused
        write_output_dir(".", write_posterior(0.2), flag="--out")
    assert hidden(tmp_path) == []


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(TFBError, match="is a file, not a directory"):
        write_output_dir(tmp_path / "f", write_posterior(0.1), force=True)
    assert (tmp_path / "f").read_text() == "mine"


def test_a_failed_write_leaves_what_was_there(tmp_path):
    out = tmp_path / "post"
    write_output_dir(out, write_posterior(0.1))
    before = snapshot(out)

    def fails(tmp):
        write_posterior(0.2)(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_output_dir(out, fails, force=True)
    with pytest.raises(OSError, match="disk full"):
        write_output_dir(tmp_path / "new", fails)
    assert snapshot(out) == before and hidden(tmp_path) == [] and not (tmp_path / "new").exists()


def test_a_mount_point_is_filled_file_by_file_marker_last(tmp_path, monkeypatch):
    """A volume mounted at --posterior-out cannot be renamed: its files are moved in, the marker
    last (checked by the order of the renames)."""
    out = tmp_path / "volume"
    out.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real_ismount(p))
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(Path(b).name), real_replace(a, b)))
    write_output_dir(out, write_posterior(0.1))
    assert sigma_of(out) == 0.1 and moved[-1] == TFB_CONFIG_NAME and hidden(tmp_path) == []
    with pytest.raises(TFBError, match="pass --force"):
        write_output_dir(out, write_posterior(0.2))
    write_output_dir(out, write_posterior(0.2), force=True)
    assert sigma_of(out) == 0.2 and sorted(p.name for p in out.iterdir()) == sorted(snapshot(out))


# --- report files -------------------------------------------------------------------------------------


def test_a_report_file_is_renamed_into_place_and_never_over_an_input(tmp_path, user_dir):
    report = tmp_path / "new" / "report.json"  # a missing parent is made
    write_output_file(report, lambda tmp: tmp.write_text("1"))
    write_output_file(report, lambda tmp: tmp.write_text("2"))  # a previous report is replaced
    assert report.read_text() == "2" and hidden(tmp_path) == []
    with pytest.raises(OSError):
        write_output_file(report, lambda tmp: (tmp.write_text("half"), open(tmp / "x")))
    assert report.read_text() == "2" and hidden(tmp_path) == []
    before = snapshot(user_dir)
    cal = user_dir / "cal.jsonl"
    for path, what in ((cal, "is the input --data"), (user_dir / "r.json", "is inside the input --adapter")):
        with pytest.raises(TFBError, match=f"--json {path} {what}"):
            write_output_file(path, lambda tmp: tmp.write_text("x"), flag="--json",
                              inputs=[("--data", cal), ("--adapter", user_dir)])
    with pytest.raises(TFBError, match="is a directory"):
        write_output_file(user_dir, lambda tmp: tmp.write_text("x"))
    assert snapshot(user_dir) == before and hidden(tmp_path) == []


# --- the real commands ----------------------------------------------------------------------------------


def bayesianize(llama_dir, adapter, out, *extra) -> int:
    return main(["--log-level", "warning", "bayesianize", "--model", str(llama_dir), "--adapter", str(adapter),
                 "--sigma", "0.02", "--out", str(out), "--device", "cpu", "--dtype", "float32", *extra])


def test_bayesianize_out_matrix(tmp_path, llama_dir, lora_dir, user_dir, capsys):
    """The issue's cases on the real command: a data folder (with the calibration file), the
    adapter itself, a previous posterior; 0 user files lost."""
    before = snapshot(user_dir) | {f"lora/{k}": v for k, v in snapshot(lora_dir).items()}

    def refused(*argv, says):
        capsys.readouterr()
        assert bayesianize(llama_dir, *argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tfb bayesianize: error: --out ") and says in err[0], err

    refused(lora_dir, user_dir, says="is not empty")
    refused(lora_dir, user_dir, "--force", says="is not empty")
    refused(lora_dir, user_dir, "--calibration", str(user_dir / "cal.jsonl"), "--force",
            says="contains the input --calibration")
    refused(lora_dir, lora_dir, "--force", says="is the input --adapter")
    assert snapshot(user_dir) | {f"lora/{k}": v for k, v in snapshot(lora_dir).items()} == before

    post = tmp_path / "post"
    assert bayesianize(llama_dir, lora_dir, post) == 0
    first = snapshot(post)
    refused(lora_dir, post, says="already holds a Bayesianized adapter: pass --force")
    assert snapshot(post) == first
    # a posterior is an adapter too: Bayesianizing it again into itself is refused with --force
    refused(post, post, "--force", says="is the input --adapter")
    assert bayesianize(llama_dir, lora_dir, post, "--force", "--sigma", "0.03") == 0
    assert sigma_of(post) == 0.03 and hidden(tmp_path) == []


def test_bayesianize_out_dot_is_one_line_and_leaves_nothing(tmp_path, llama_dir, lora_dir):
    """``--out .``: exit 2, one line, no traceback, no ``..old.*`` folder (before: OSError EBUSY)."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "mine.txt").write_text("mine")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for extra in ([], ["--force"]):
        proc = subprocess.run([sys.executable, "-m", "server.cli", "bayesianize", "--model", str(llama_dir),
                               "--adapter", str(lora_dir), "--sigma", "0.02", "--out", ".", *extra],
                              cwd=here, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines() == [
            "tfb bayesianize: error: --out . is the current directory: refusing to replace it (even with "
            "--force); name a new or empty directory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]
    assert sorted(p.name for p in here.iterdir()) == ["mine.txt"]


def test_finetune_follows_the_rule(tmp_path, llama_dir, user_dir, capsys):
    from tfb_core.data import MCItem, write_jsonl

    data = user_dir / "train.jsonl"
    write_jsonl([MCItem(choices=["a", "b"], question=f"q{i}?", answer=i % 2) for i in range(4)], data)
    before = snapshot(user_dir)
    argv = ["--log-level", "warning", "finetune", "--model", str(llama_dir), "--data", str(data), "--epochs", "1",
            "--batch-size", "4", "--dtype", "float32", "--device", "cpu"]
    for out, says in ((user_dir, "contains the input --data"), (user_dir / "sub", "is not empty")):
        capsys.readouterr()
        assert main(argv + ["--out", str(out), "--force"]) == 2
        assert says in capsys.readouterr().err
    assert snapshot(user_dir) == before
    out = tmp_path / "ad"
    assert main(argv + ["--out", str(out)]) == 0
    assert tfb_output(out) == "finetuned adapter"
    assert main(argv + ["--out", str(out)]) == 2
    assert "already holds a finetuned adapter: pass --force" in capsys.readouterr().err
    assert main(argv + ["--out", str(out), "--force", "--seed", "1"]) == 0
    assert json.loads((out / "finetune.json").read_text())["config"]["seed"] == 1 and hidden(tmp_path) == []


def test_eval_never_writes_its_report_over_an_input(tmp_path, llama_dir, lora_dir, capsys):
    from tfb_core.data import MCItem, write_jsonl

    data = tmp_path / "test.jsonl"
    write_jsonl([MCItem(choices=["a", "b"], question="q?", answer=0)], data)
    before = snapshot(tmp_path)
    argv = ["eval", "--model", str(llama_dir), "--adapter", str(lora_dir), "--data", str(data), "--device", "cpu"]
    for extra, says in ((["--json", str(data)], f"--json {data} is the input --data"),
                        (["--plot", str(lora_dir / "adapter_config.json")], "is inside the input --adapter"),
                        (["--json", str(tmp_path / "r"), "--plot", str(tmp_path / "r")], "name the same file")):
        assert main(argv + extra) == 2
        assert says in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    report = tmp_path / "reports" / "r.json"
    assert main(argv + ["--json", str(report), "--samples", "2"]) == 0
    assert json.loads(report.read_text())["samples"] == 2 and hidden(tmp_path) == []


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask
