"""tfb_core.evaluate and `tfb eval`: hand-computed metrics on tiny cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deploy_helpers import need_modules
from tfb_core import evaluate as ev
from tfb_core.cli import main
from tfb_core.data import MCItem, write_jsonl

# 4 predictions, K = 1, 2 classes: preds 0, 0, 1, 0 (a tie goes to 0); labels 0, 1, 1, 0
P = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)[:, None, :]
Y = torch.tensor([0, 1, 1, 0])


def test_metrics_by_hand():
    m = ev.metrics(P, Y)
    assert set(m) == set(ev.METRIC_KEYS)
    assert m["acc"] == pytest.approx(0.75)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.8) + math.log(0.5)) / 4)
    assert m["brier"] == pytest.approx((0.02 + 0.72 + 0.08 + 0.5) / 4)
    # one item per bin: |0.9 - 1|, |0.6 - 0|, |0.8 - 1|, |0.5 - 1|
    assert m["ece"] == pytest.approx(100 * (0.1 + 0.6 + 0.2 + 0.5) / 4)
    assert m["mean_mi"] == pytest.approx(0.0, abs=1e-12)
    # the wrong answer (item 1, max p 0.6) vs right ones with max p 0.9, 0.8, 0.5: ranks 1 of 3
    assert m["auroc_err_maxprob"] == pytest.approx(2 / 3)
    assert m["auroc_err_mi"] == pytest.approx(0.5)  # MI is 0 everywhere: all ties


def test_mutual_information_of_disagreeing_samples():
    sp = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]], dtype=torch.float64)
    m = ev.metrics(sp, torch.tensor([0, 0]))
    assert m["mean_mi"] == pytest.approx(math.log(2) / 2)
    assert m["mean_pe"] == pytest.approx(math.log(2))


def test_temper_properties():
    sp = torch.tensor([[[0.7, 0.2, 0.1, 0.0]]], dtype=torch.float64)  # a padded 4th choice
    assert torch.equal(ev.temper(sp, 1.0), sp)
    hot = ev.temper(sp, 1e6)
    assert hot[0, 0, :3] == pytest.approx(torch.full((3,), 1 / 3, dtype=torch.float64), abs=1e-5)
    assert hot[0, 0, 3] == 0
    cold = ev.temper(sp, 0.5)  # p^2 renormalised
    assert cold[0, 0, :3] == pytest.approx(torch.tensor([0.49, 0.04, 0.01], dtype=torch.float64) / 0.54)


def test_fit_temperature_softens_an_overconfident_model():
    torch.manual_seed(0)
    n = 400
    y = torch.randint(0, 4, (n,))
    right = torch.rand(n) < 0.6  # 60% accuracy at 0.97 confidence
    pred = torch.where(right, y, (y + 1) % 4)
    p = torch.full((n, 4), 0.01, dtype=torch.float64)
    p[torch.arange(n), pred] = 0.97
    t = ev.fit_temperature(p, y)
    assert t > 1.5
    assert ev.nll(ev.temper(p, t), y) < ev.nll(p, y)
    # the minimum: NLL at t is below its neighbours' (1% away)
    assert all(ev.nll(ev.temper(p, t), y) <= ev.nll(ev.temper(p, t * f), y) for f in (0.99, 1.01))


def test_ood_metrics_by_hand():
    sure = torch.tensor([[[0.99, 0.01]], [[0.95, 0.05]]], dtype=torch.float64)
    unsure = torch.tensor([[[0.5, 0.5]], [[0.6, 0.4]]], dtype=torch.float64)
    o = ev.ood_metrics(sure, unsure)
    assert o["auroc_pe"] == pytest.approx(1.0)
    assert o["auroc_maxprob"] == pytest.approx(1.0)


def test_score_mixed_pads_and_keeps_order(llama_dir, lora_dir):
    from tfb_core.models import load_base_model
    from tfb_core.posterior import Posterior
    from tfb_core.scoring import score_items

    post = Posterior.from_adapter(load_base_model(llama_dir, "cpu", "float32"), lora_dir)
    items = [MCItem(choices=["a", "b", "c"], question="q1?"), MCItem(choices=["x", "y"], question="q2?"),
             MCItem(choices=["u", "v", "w"], question="q3?")]
    out = ev.score_mixed(post, items, mode="letter", num_samples=2, sigma=0.1)
    assert out.shape == (3, 2, 3)
    assert out[1, :, 2].eq(0).all()
    assert torch.allclose(out.sum(-1), torch.ones(3, 2), atol=1e-5)
    alone = score_items(post, items[1:2], mode="letter", num_samples=2, sigma=0.1)
    assert torch.allclose(out[1, :, :2], alone[0], atol=1e-6)


@need_modules("matplotlib", why="matplotlib (the eval extra: --plot)")
def test_tfb_eval_cli(tmp_path, llama_dir, lora_dir, capsys):
    items = [MCItem(choices=["red", "green", "blue"], question=f"Which colour is number {i}?", answer=i % 3)
             for i in range(6)]
    data, ood = tmp_path / "d.jsonl", tmp_path / "o.jsonl"
    write_jsonl(items, data)
    write_jsonl([MCItem(choices=["yes", "no"], question=f"Is {i} odd?", answer=i % 2) for i in range(4)], ood)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["eval", "--model", str(llama_dir), "--adapter", str(lora_dir), "--data", str(data),
               "--ood", str(ood), "--samples", "3", "--sigma", "0.2", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    assert "deterministic" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["n"] == 6 and report["samples"] == 3 and report["sigma"] == 0.2 and report["mode"] == "letter"
    for key in ("deterministic", "tfb"):
        assert set(ev.METRIC_KEYS) <= set(report[key])
    assert set(report["ood"]) >= {"auroc_mi", "auroc_pe"}
    assert report["deterministic"]["mean_mi"] == 0 and report["tfb"]["mean_mi"] > 0
    assert png.stat().st_size > 1000
    # the deterministic column is sigma = 0, K = 1 scored by hand
    from tfb_core.models import load_base_model
    from tfb_core.posterior import Posterior
    from tfb_core.scoring import score_items

    post = Posterior.from_adapter(load_base_model(llama_dir, "cpu", "float32"), lora_dir)
    p = score_items(post, items, mode="letter", num_samples=1, sigma=0.0)[:, 0].double()
    y = torch.tensor([it.answer for it in items])
    assert report["deterministic"]["acc"] == pytest.approx((p.argmax(-1) == y).double().mean().item())
    assert report["deterministic"]["nll"] == pytest.approx(-p[torch.arange(6), y].log().mean().item(), rel=1e-5)


def test_tfb_eval_per_item_returns_metadata(tmp_path, llama_dir, lora_dir):
    data, out = tmp_path / "d.jsonl", tmp_path / "r.json"
    data.write_text("\n".join(json.dumps({"id": f"q{i}", "question": f"Colour {i}?", "source": f"s{i}",
                                           "choices": ["red", "green", "blue"][: 2 + i % 2], "answer": i % 2})
                              for i in range(4)) + "\n")
    assert main(["eval", "--model", str(llama_dir), "--adapter", str(lora_dir), "--data", str(data),
                 "--samples", "3", "--sigma", "0.2", "--json", str(out), "--per-item"]) == 0
    rows = json.loads(out.read_text())["items"]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3"]
    assert [r["metadata"] for r in rows] == [{"source": f"s{i}"} for i in range(4)]
    for i, r in enumerate(rows):
        assert len(r["probs"]) == 2 + i % 2 and sum(r["probs"]) == pytest.approx(1, abs=1e-5)
        assert r["prediction"] == max(range(len(r["probs"])), key=r["probs"].__getitem__)
        assert r["answer"] == i % 2 and r["mutual_information"] >= 0
        assert r["predictive_entropy"] >= r["mutual_information"]
    assert main(["eval", "--model", str(llama_dir), "--adapter", str(lora_dir), "--data", str(data),
                 "--per-item"]) == 2  # needs --json


def test_tfb_eval_needs_answers(tmp_path, llama_dir, lora_dir):
    data = tmp_path / "d.jsonl"
    write_jsonl([MCItem(choices=["a", "b"], question="q?")], data)
    assert main(["eval", "--model", str(llama_dir), "--adapter", str(lora_dir), "--data", str(data)]) == 2
