"""tfb_core.finetune: MLE LoRA training lowers the loss; the adapter it writes loads in tfb."""

from __future__ import annotations

import json

import pytest

from tfb_core.cli import main
from tfb_core.data import MCItem, write_jsonl
from tfb_core.finetune import FinetuneConfig, finetune
from tfb_core.models import load_base_model
from tfb_core.posterior import Posterior

ITEMS = [MCItem(choices=["red", "green", "blue", "black"], question=f"Which colour is item {i}?", answer=i % 4)
         for i in range(8)]


@pytest.mark.parametrize("mode", ["letter", "sequence"])
def test_finetune_lowers_the_loss(tmp_path, llama_dir, mode):
    base = load_base_model(llama_dir, "cpu", "float32")
    cfg = FinetuneConfig(mode=mode, epochs=4, batch_size=8, lr=2e-2, warmup_steps=1, rank=4,
                         targets=["q_proj", "v_proj", "down_proj"])
    history = finetune(base, ITEMS, tmp_path / "ad", cfg, heldout=ITEMS[:4], progress=False)
    assert len(history) == 4
    assert history[-1].train_loss < history[0].train_loss
    assert 0 <= history[-1].heldout_acc <= 1
    log = json.loads((tmp_path / "ad" / "finetune.json").read_text())
    assert log["config"]["mode"] == mode and log["steps"] == 4
    post = Posterior.from_adapter(load_base_model(llama_dir, "cpu", "float32"), tmp_path / "ad")
    assert len(post.layers) == 3 * 2  # 3 targets x 2 layers


def test_finetune_cli_and_time_budget(tmp_path, llama_dir):
    data = tmp_path / "train.jsonl"
    write_jsonl(ITEMS, data)
    rc = main(["finetune", "--model", str(llama_dir), "--data", str(data), "--out", str(tmp_path / "ad"),
               "--epochs", "50", "--batch-size", "4", "--time-budget", "0", "--dtype", "float32", "--chat"])
    assert rc == 0
    log = json.loads((tmp_path / "ad" / "finetune.json").read_text())
    assert log["steps"] == 1 < log["planned_steps"]  # stopped by the budget after one step
    assert log["config"]["chat"] is True


def test_finetune_needs_answers(tmp_path, llama_dir):
    from tfb_core.errors import TFBError

    base = load_base_model(llama_dir, "cpu", "float32")
    with pytest.raises(TFBError, match="answer"):
        finetune(base, [MCItem(choices=["a", "b"], question="q?")], tmp_path / "ad", progress=False)
