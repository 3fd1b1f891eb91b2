"""``tfb bayesianize``: the issue's "done when", in-process and as a subprocess.

The written directory is checked against the ORIGINAL adapter's files (numpy SVD, float64) and
its recorded sigma against the criterion recomputed with explicit-weight models: one plain
model per weight sample, one prompt at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import explicit_model, fresh_base, mc_items, peft_model, read_lora, ref_letter, svd64

from tfb_core.cli import main
from tfb_core.data import write_jsonl
from tfb_core.errors import TFBError
from tfb_core.posterior import POSTERIOR_NAME, TFB_CONFIG_NAME, Posterior
from tfb_core.sampling import row_std

REPO = Path(__file__).resolve().parents[1]
K = 4
EPS = 0.01


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "cal.jsonl"
    write_jsonl(mc_items(12, seed=2, answers=False), path)
    return path


@pytest.fixture(scope="module")
def bad_calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("badcal") / "bad.jsonl"
    path.write_text(json.dumps({"question": "ok?", "choices": ["a", "b"]}) + "\n"
                    + json.dumps({"question": "dup?", "choices": ["a", "a"]}) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, llama_dir, lora_dir, calibration):
    out = tmp_path_factory.mktemp("cli") / "bayes"
    argv = ["--log-level", "warning", "bayesianize", "--model", str(llama_dir), "--adapter", str(lora_dir),
            "--calibration", str(calibration), "--out", str(out), "--samples", str(K), "--eps", str(EPS),
            "--criterion", "nll", "--seed", "0", "--device", "cpu", "--dtype", "float32"]
    return main(argv), out


def test_bayesianize_writes_the_directory(run, capsys):
    code, out = run
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", POSTERIOR_NAME, TFB_CONFIG_NAME])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_written_factors_keep_ba_and_stds_are_sigma_over_d(run, llama_dir, lora_dir):
    from safetensors.torch import load_file

    _, out = run
    cfg = json.loads((out / TFB_CONFIG_NAME).read_text())
    sigma = cfg["sigma"]
    assert sigma > 0
    _, original = read_lora(lora_dir)
    _, written = read_lora(out)
    stored_d = load_file(out / POSTERIOR_NAME)
    post = Posterior.load(fresh_base(llama_dir), out)
    stds = {layer.name: row_std(layer.d, post.sigma) for layer in post.layers}
    assert sorted(written) == sorted(original) == sorted(stds)
    for name, (A, B) in original.items():
        A1, B1 = written[name]
        assert ((B1 @ A1 - B @ A).norm() / (B @ A).norm()).item() < 1e-5, name
        d = svd64(B)[1]
        assert torch.allclose(stored_d[f"{name}.d"].double(), d, rtol=1e-5), name
        assert torch.allclose(stds[name].double(), sigma / d, rtol=1e-5), name


def test_recorded_sigma_satisfies_the_recorded_criterion(run, llama_dir, lora_dir, calibration):
    from tfb_core.data import read_jsonl

    _, out = run
    cfg = json.loads((out / TFB_CONFIG_NAME).read_text())
    assert (cfg["criterion"], cfg["eps"], cfg["num_samples"], cfg["seed"], cfg["mode"]) == ("nll", EPS, K, 0, "letter")
    assert cfg["calibration_sha256"] == hashlib.sha256(calibration.read_bytes()).hexdigest()
    items = read_jsonl(calibration)
    tok = fresh_base(llama_dir).tokenizer
    # sigma = 0: the adapter itself (peft), targets = its argmax (pseudo-labels)
    ref = peft_model(llama_dir, lora_dir)
    p0 = [ref_letter(ref, tok, it) for it in items]
    targets = [int(p.argmax()) for p in p0]
    nll0 = sum(-math.log(p[y]) for p, y in zip(p0, targets)) / len(items)

    def rel_nll(sigma):
        post = Posterior.load(fresh_base(llama_dir), out)  # only for B', A', s and module names
        models = [explicit_model(llama_dir, post, cfg["seed"], k, sigma, adapter_dir=lora_dir) for k in range(K)]
        avg = [sum(ref_letter(m, tok, it) for m in models) / K for it in items]  # average probabilities
        return (sum(-math.log(p[y]) for p, y in zip(avg, targets)) / len(items) - nll0) / nll0

    assert rel_nll(cfg["sigma"]) <= EPS
    # and the search's bracket point above it does not meet it
    above = min(p["sigma"] for p in cfg["search_trace"] if p["sigma"] > cfg["sigma"])
    assert rel_nll(above) > EPS


def test_bad_calibration_exits_2_with_one_line(bad_calibration, tmp_path, llama_dir, lora_dir, capsys):
    code = main(["bayesianize", "--model", str(llama_dir), "--adapter", str(lora_dir),
                 "--calibration", str(bad_calibration), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(bad_calibration) in err[0] and "line 2" in err[0] and "distinct" in err[0]
    assert not (tmp_path / "o").exists()


def test_bad_calibration_subprocess(bad_calibration, tmp_path, llama_dir, lora_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "bayesianize", "--model", str(llama_dir), "--adapter", str(lora_dir),
         "--calibration", str(bad_calibration), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("tfb bayesianize: error:") and str(bad_calibration) in lines[0] and "line 2" in lines[0]


@pytest.mark.parametrize("extra,problem", [
    ([], "--calibration FILE is required unless --sigma is given"),
    (["--sigma", "-1"], "--sigma must be >= 0"),
])
def test_argument_errors(tmp_path, llama_dir, lora_dir, capsys, extra, problem):
    code = main(["bayesianize", "--model", str(llama_dir), "--adapter", str(lora_dir), "--out", str(tmp_path / "o")] + extra)
    assert code == 2
    assert problem in capsys.readouterr().err


def test_missing_model_and_adapter(tmp_path, llama_dir, lora_dir, capsys):
    code = main(["bayesianize", "--model", str(tmp_path / "nomodel"), "--adapter", str(lora_dir),
                 "--sigma", "0.1", "--out", str(tmp_path / "o")])
    assert code == 2 and "nomodel" in capsys.readouterr().err
    code = main(["bayesianize", "--model", str(llama_dir), "--adapter", str(tmp_path / "noadapter"),
                 "--sigma", "0.1", "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]  # (transformers' loading bar aside)
    assert code == 2 and len(errors) == 1 and "noadapter" in errors[0] and "Traceback" not in err


def test_unknown_criterion_and_mode(tmp_path, capsys):
    for flag, value in (("--criterion", "kl"), ("--mode", "logits")):
        with pytest.raises(SystemExit) as e:
            main(["bayesianize", "--adapter", "x", "--out", str(tmp_path / "o"), flag, value])
        assert e.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_search_flags_are_generated_from_search_config(tmp_path, capsys):
    """Every SearchConfig field is a `tfb bayesianize` flag with its help and default, and the
    flags give back the SearchConfig; a bad value is one line naming the field, exit 2."""
    import dataclasses

    from tfb_core.cli import build_parser, search_config
    from tfb_core.options import Criterion, Metric, Mode, Score, SearchConfig

    with pytest.raises(SystemExit):
        main(["bayesianize", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    for f in dataclasses.fields(SearchConfig):
        assert SearchConfig.flag(f.name) in help_text, f.name
        assert "".join(SearchConfig.help(f.name).split()) in help_text, f.name
    assert "--samplesSAMPLES" in help_text and "(default:0.003)" in help_text
    base = ["bayesianize", "--adapter", "a", "--out", "o"]
    assert search_config(build_parser().parse_args(base)) == SearchConfig()
    args = build_parser().parse_args(base + ["--criterion", "cv-nll", "--samples", "4", "--mode", "sequence",
                                             "--conformal-score", "aps", "--abstain-on", "predictive_entropy",
                                             "--no-temperature", "--sigma-grid", "0,0.02", "--chat"])
    cfg = search_config(args)
    assert (cfg.criterion, cfg.num_samples, cfg.mode, cfg.score, cfg.abstain_on) == \
        (Criterion.CV_NLL, 4, Mode.SEQUENCE, Score.APS, Metric.PE)
    assert cfg.temperature is False and cfg.sigma_grid == (0.0, 0.02) and cfg.chat is True
    assert main(base + ["--out", str(tmp_path / "o"), "--eps", "0", "--calibration", "c.jsonl"]) == 2
    assert capsys.readouterr().err.strip() == "tfb bayesianize: error: eps must be > 0, got 0.0"


def test_enums_accept_their_strings_everywhere():
    from server.protocol import ChoiceItem
    from server.settings import Settings
    from tfb_core.options import Criterion, Mode
    from tfb_core.posterior import TFBConfig

    assert Settings(criterion="cv-nll", mode="sequence").criterion is Criterion.CV_NLL
    assert Settings().mode is None and f"{Settings().criterion}" == "auto"
    assert ChoiceItem(question="q", choices=["a", "b"], mode="sequence").mode is Mode.SEQUENCE
    assert TFBConfig(mode="letter", criterion="nll").mode is Mode.LETTER
    with pytest.raises(TFBError, match="unknown mode 'words'"):
        TFBConfig(mode="words")
    assert json.dumps({"m": Mode.LETTER, "c": Criterion.AUTO}) == '{"m": "letter", "c": "auto"}'


def test_fixed_sigma_without_calibration(tmp_path, llama_dir, lora_dir, capsys):
    out = tmp_path / "fixed"
    code = main(["bayesianize", "--model", str(llama_dir), "--adapter", str(lora_dir), "--sigma", "0.02",
                 "--out", str(out), "--device", "cpu", "--dtype", "float32"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["sigma"] == 0.02 and printed["modules"] == 7 and Path(printed["out"]) == out
    post = Posterior.load(fresh_base(llama_dir), out)
    assert post.sigma == 0.02 and post.config.criterion is None
