"""``tfb eval --generate`` (tfb_core.qa) end to end on the tiny Llama, its match rule, its metrics
recomputed in numpy from the per-item rows, and its bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tfb_core.cli import main
from tfb_core.errors import TFBError
from tfb_core.posterior import Posterior
from tfb_core.qa import QAItem, evaluate_generation, is_correct, load_qa, normalize, prr

from conftest import fresh_base

SIGMA, K = 0.05, 3


def np_auroc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def test_the_match_rule():
    assert normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert is_correct("Paris, France.", ["paris"]) and is_correct("the Beatles", ["Beatles"])
    assert not is_correct("Parisian food", ["Paris"]) and not is_correct("", ["a b"])
    assert is_correct("In 1969, on July 20", ["1969"])


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory, llama_dir, lora_dir):
    """Questions for the tiny model: half of them list its own greedy answer as right."""
    post = Posterior.from_adapter(fresh_base(llama_dir), lora_dir)
    post.sigma = SIGMA
    questions = [f"What is item number {i}?" for i in range(24)]
    probe = evaluate_generation(post, [QAItem(q, ["zzz"]) for q in questions], num_samples=K, max_tokens=4)
    rows, kept = [], 0
    for q, r in zip(questions, probe["items"]):
        own = normalize(r["answer"])
        right = own and kept % 2 == 0
        kept += bool(own)
        rows.append({"question": q, "answers": [r["answer"]] if right else ["qqqq nothing"]})
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, sum(bool(r["answers"][0] != "qqqq nothing") for r in rows)


def test_tfb_eval_generate_end_to_end(qa_file, llama_dir, lora_dir, tmp_path, capsys):
    path, n_right = qa_file
    assert 0 < n_right < 24
    out = tmp_path / "gen.json"
    rc = main(["--log-level", "warning", "eval", "--generate", "--model", str(llama_dir), "--adapter", str(lora_dir),
               "--data", str(path), "--sigma", str(SIGMA), "--samples", str(K), "--max-tokens", "4",
               "--device", "cpu", "--json", str(out), "--per-item"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "sequence_mi" in printed.out and "AUROC wrong" in printed.out
    report = json.loads(out.read_text())
    rows = report["items"]
    assert report["n"] == 24 and report["samples"] == K and report["sigma"] == SIGMA
    assert sum(r["correct"] for r in rows) == n_right
    assert report["accuracy"] == pytest.approx(n_right / 24)
    wrong = np.array([not r["correct"] for r in rows])
    for name, m in report["scores"].items():
        s = np.array([r[name] for r in rows])
        assert m["auroc"] == pytest.approx(np_auroc(s, wrong), abs=1e-9), name
    # every score follows from the row's own fields
    for r in rows:
        assert r["mean_nll"] == pytest.approx(r["total_nll"] / max(r["num_tokens"], 1))
        assert r["sequence_mi"] >= 0 and r["sequence_mi_per_token"] == pytest.approx(r["sequence_mi"] / max(r["num_tokens"], 1))
        assert r["max_token_mi"] >= r["mean_token_mi"] - 1e-12
    assert any(r["sequence_mi"] > 0 for r in rows)


def test_prr_is_one_for_the_oracle_and_negative_reversed():
    import torch

    wrong = torch.tensor([True, False, False, True, False, False, False, True])
    assert prr(wrong.double(), wrong) == pytest.approx(1.0)
    assert prr(-wrong.double(), wrong) < 0


@pytest.mark.parametrize("line, problem", [
    ('{"question": "q?"}', "'answers' is missing"),
    ('{"question": "q?", "answers": []}', "'answers' must be a non-empty list"),
    ('{"question": "q?", "answers": ["..."]}', "a letter or digit"),
    ('{"answers": ["a"]}', "'question' must be a non-empty string"),
])
def test_bad_generation_files_name_the_file_and_line(tmp_path, line, problem, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "fine?", "answers": ["yes"]}\n' + line + "\n")
    with pytest.raises(TFBError, match=rf"bad.jsonl, line 2: .*{problem}"):
        load_qa(str(path))
    rc = main(["eval", "--generate", "--data", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "line 2" in err and problem in err


def test_generate_refuses_multiple_choice_flags(tmp_path, capsys):
    rc = main(["eval", "--generate", "--data", "sciq", "--coverage"])
    assert rc == 2 and "--coverage" in capsys.readouterr().err
