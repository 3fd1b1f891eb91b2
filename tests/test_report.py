"""The fitting report (tfb_core/report.py): each warning from plain numbers, the numbers of a real
fit on the tiny Llama recomputed (the cv-nll trace, ``tfb eval --coverage`` on the held-out half,
the risk ladder), and the report in ``tfb bayesianize``'s output, in tfb_config.json, in the
start-up search's log and in ``/v1/posterior``."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace

import httpx
import pytest
import torch
from conftest import fresh_base, mc_items
from server_helpers import ServerThread

from tfb_core.cli import main
from tfb_core.conformal import binomial_upper, holdout_split, risk_threshold
from tfb_core.data import write_jsonl
from tfb_core.errors import TFBError
from tfb_core.posterior import TFB_CONFIG_NAME, Posterior
from tfb_core.report import RECOMMENDED_ITEMS, FitReport, ModeScore, assess, chance_margin, held_out_needed
from tfb_core.scoring import score_items

K = 3
GRID = [0.01, 0.05, 0.2]


# --- the warnings, from plain numbers ------------------------------------------------------------------


def good(**changes) -> FitReport:
    """A report with nothing to warn about: sigma inside the grid, 80% on 4 choices, 200 held out."""
    base = dict(sigma=0.01, temperature=0.8, mode="letter", criterion="cv-nll", grid=[0.0, 0.005, 0.01, 0.02],
                grid_index=2, calibration_items=400, fit_items=200, labelled=True, chance=0.25, choices="4",
                nll_0=0.6, accuracy_0=0.8, nll_sigma=0.55, accuracy_sigma=0.8, held_out=200, coverage=0.9,
                set_coverage=0.91, set_size=1.4, max_risk=0.1, certified_risk=0.1, answered=0.6,
                held_out_needed=held_out_needed(0.1), confidence_model="platt")
    return assess(FitReport(**{**base, **changes}))


def test_a_good_fit_warns_nothing_and_is_ready():
    r = good()
    assert r.warnings == [] and r.verdict.startswith("READY")
    table = r.table()
    assert table.splitlines()[-1] == f"  verdict: {r.verdict}"
    for cell in ("0.01 (cv-nll, grid point 3 of 4", "temperature T", "sigma 0: 0.6000 / 80.0%",
                 "coverage 91.0% at target 0.9, mean size 1.40", "smallest certified risk 0.1", "answers 60.0%",
                 "platt"):
        assert cell in table, cell


def test_sigma_zero_says_the_posterior_adds_no_uncertainty_and_what_to_try():
    r = good(sigma=0.0, grid_index=0, nll_sigma=0.6)
    assert len(r.warnings) == 1 and r.verdict.startswith("NOT READY: sigma = 0")
    w = r.warnings[0]
    assert w.startswith("sigma = 0: the posterior adds no uncertainty") and "K = 10" in w
    suggested = [float(x) for x in w.split("--sigma-grid ")[1].split(",")[:5]]
    assert suggested[0] == 0 and all(0 < s < 0.005 for s in suggested[1:])  # below the grid's smallest
    assert "--eps" in good(sigma=0.0, criterion="nll", grid_index=None).warnings[0]
    assert "--sigma" in good(sigma=0.0, criterion=None, grid_index=None).warnings[0]


@pytest.mark.parametrize("edge,sigma", [("top", 0.02), ("bottom", 0.005)])
def test_sigma_at_a_grid_edge_suggests_an_extended_grid(edge, sigma):
    r = good(sigma=sigma, edge=edge)
    assert len(r.warnings) == 1 and r.verdict.startswith("USABLE WITH CAVEATS")
    w = r.warnings[0]
    assert f"{edge}" in w and "--sigma-grid" in w
    grid = [float(x) for x in w.split("--sigma-grid ")[1].split(",")]
    assert set(good().grid) <= set(grid)  # the old grid, extended beyond the edge
    assert (max(grid) > 0.02) if edge == "top" else (min(s for s in grid if s > 0) < 0.005)


def test_accuracy_near_chance_names_a_clearly_better_mode():
    margin = chance_margin(0.25, 200)
    near = good(accuracy_sigma=0.25 + margin - 0.01)
    assert len(near.warnings) == 1 and near.verdict.startswith("NOT READY: accuracy near chance")
    assert "near chance (25.0% with 4 choices)" in near.warnings[0] and "pass --mode" not in near.warnings[0]
    assert good(accuracy_sigma=0.25 + margin + 0.01).warnings == []
    modes = [ModeScore("letter", False, 0.26, 1.38), ModeScore("sequence", False, 0.72, 0.8),
             ModeScore("sequence", True, 0.70, 0.9)]
    better = good(accuracy_sigma=0.26, modes=modes).warnings[0]
    assert "sequence scores 72.0%" in better and "pass --mode sequence," in better
    # a mode that is better by less than the margin is not named
    close = [ModeScore("letter", False, 0.26, 1.38), ModeScore("sequence", False, 0.26 + margin - 0.01, 1.3)]
    assert "pass --mode" not in good(accuracy_sigma=0.26, modes=close).warnings[0]


def test_held_out_too_small_for_the_risk_target_says_how_many():
    need = held_out_needed(0.1)
    r = good(held_out=need - 1, certified_risk=0.2, answered=0.0)
    assert len(r.warnings) == 1
    assert f"{need - 1} held-out items cannot certify an error rate of 0.1" in r.warnings[0]
    assert f"that takes {need}" in r.warnings[0] and "--max-risk to 0.2" in r.warnings[0]
    assert good(held_out=need).warnings == []


def test_a_small_calibration_file_is_warned_against():
    r = good(calibration_items=RECOMMENDED_ITEMS - 1)
    assert len(r.warnings) == 1 and f"{RECOMMENDED_ITEMS} or more" in r.warnings[0]


def test_held_out_needed_is_the_smallest_all_correct_set_that_certifies():
    for max_risk in (0.1, 0.2, 0.5):
        n = held_out_needed(max_risk)

        def certifies(m):
            return risk_threshold(torch.arange(m, dtype=torch.float64), torch.ones(m, dtype=torch.bool),
                                  max_risk).threshold is not None

        assert certifies(n) and not any(certifies(m) for m in range(1, n))
        assert binomial_upper(0, n, 0.05) <= max_risk  # the bound it rests on
    assert held_out_needed(0.1) == 96  # README, "How many calibration items"


def test_from_dict_round_trip_and_bad_values():
    r = good(modes=[ModeScore("letter", False, 0.5, 1.0)])
    assert FitReport.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(TFBError, match="'fit_report' must be an object"):
        FitReport.from_dict([1])
    with pytest.raises(TFBError, match="'fit_report' is malformed"):
        FitReport.from_dict({"sigma": 0.1})


# --- a real fit ------------------------------------------------------------------------------------------

N_ITEMS = 40


@pytest.fixture(scope="module")
def labelled(llama_dir, lora_dir):
    """Items the tiny model mostly gets right: 80% labelled with its own sigma-0 answer."""
    post = Posterior.from_adapter(fresh_base(llama_dir), lora_dir)
    items = mc_items(N_ITEMS, seed=5)
    p0 = score_items(post, items, num_samples=1, sigma=0.0)[:, 0]
    rng = random.Random(0)
    return [replace(it, answer=int(p.argmax()) if rng.random() < 0.8 else it.answer) for it, p in zip(items, p0)]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, llama_dir, lora_dir, labelled):
    p = Posterior.from_adapter(fresh_base(llama_dir), lora_dir)
    result = p.fit(labelled, num_samples=K, sigma_grid=GRID, max_risk=0.3, mode="letter",
                           progress=False)
    return p.save(tmp_path_factory.mktemp("fitted") / "post"), result


def test_the_report_of_a_fit_is_recorded_and_its_numbers_are_the_fits(fitted, labelled, llama_dir):
    out, result = fitted
    loaded = Posterior.load(fresh_base(llama_dir), out)
    report = FitReport.from_dict(loaded.config.fit_report)
    assert report == result.report
    assert (report.sigma, report.temperature, report.mode) == (loaded.sigma, loaded.config.temperature, "letter")
    assert report.grid == [0.0] + GRID and report.grid[report.grid_index] == report.sigma
    trace = {p["sigma"]: p for p in loaded.config.search_trace}
    assert (report.nll_0, report.accuracy_0) == (trace[0.0]["value"], trace[0.0]["accuracy"])
    assert (report.nll_sigma, report.accuracy_sigma) == (trace[report.sigma]["value"], trace[report.sigma]["accuracy"])
    assert (report.calibration_items, report.fit_items, report.held_out) == (N_ITEMS, 20, 20)
    assert report.confidence_model == loaded.config.confidence["model"]
    cal = loaded.config.conformal
    ladder = [r for r in (0.1, 0.2, 0.3, 0.4, 0.5) if cal.risk_threshold(r).threshold is not None]
    assert report.certified_risk == (ladder[0] if ladder else None)
    rule = cal.risk_threshold()
    assert report.answered == (rule.accepted / rule.n if rule.threshold is not None else 0.0)
    assert f"the calibration file has {N_ITEMS} items" in " ".join(report.warnings)


def test_the_reports_held_out_numbers_match_tfb_eval_on_the_held_out_half(fitted, labelled, llama_dir, tmp_path,
                                                                         capsys):
    out, result = fitted
    _, held_idx = holdout_split(N_ITEMS, 0.5, seed=0)
    data = tmp_path / "held.jsonl"
    write_jsonl([labelled[i] for i in held_idx], data)
    report_json = tmp_path / "eval.json"
    assert main(["eval", "--model", str(llama_dir), "--adapter", str(out), "--data", str(data), "--coverage",
                 "--json", str(report_json), "--device", "cpu"]) == 0
    capsys.readouterr()
    ev = json.loads(report_json.read_text())
    r = result.report
    assert ev["sets"]["0.9"]["coverage"] == pytest.approx(r.set_coverage, abs=1e-12)
    assert ev["sets"]["0.9"]["size"] == pytest.approx(r.set_size, abs=1e-12)
    assert ev["abstention"]["threshold_rule"]["coverage"] == pytest.approx(r.answered, abs=1e-12)


def test_an_older_tfb_config_without_a_report_still_loads(fitted, tmp_path, llama_dir):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(fitted[0], copy)
    cfg = json.loads((copy / TFB_CONFIG_NAME).read_text())
    del cfg["fit_report"]
    (copy / TFB_CONFIG_NAME).write_text(json.dumps(cfg))
    assert Posterior.load(fresh_base(llama_dir), copy).config.fit_report is None
    cfg["fit_report"] = "good"
    (copy / TFB_CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(TFBError, match="'fit_report' must be an object") as e:
        Posterior.load(fresh_base(llama_dir), copy)
    assert str(copy) in str(e.value)


# --- where the report is shown -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cal_file(tmp_path_factory, labelled):
    path = tmp_path_factory.mktemp("cal") / "cal.jsonl"
    write_jsonl(labelled, path)
    return path


def test_bayesianize_ends_with_the_table(cal_file, llama_dir, lora_dir, tmp_path, capsys):
    code = main(["--log-level", "warning", "bayesianize", "--model", str(llama_dir), "--adapter", str(lora_dir),
                 "--calibration", str(cal_file), "--out", str(tmp_path / "o"), "--samples", str(K),
                 "--sigma-grid", ",".join(map(str, GRID)), "--mode", "letter", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = json.loads(captured.out.strip().splitlines()[-1])
    recorded = json.loads((tmp_path / "o" / TFB_CONFIG_NAME).read_text())["fit_report"]
    assert printed["verdict"] == recorded["verdict"] and printed["warnings"] == recorded["warnings"]
    err = captured.err.strip().splitlines()
    start = err.index("tfb fit report")
    assert err[start:] == FitReport.from_dict(recorded).table().splitlines()  # the table comes last
    assert err[-1].startswith("  verdict: ")


def test_startup_search_logs_the_table_and_serves_it(cal_file, llama_dir, lora_dir, tmp_path, monkeypatch,
                                                     caplog):
    monkeypatch.setenv("TFB_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="server.loader"):
        with ServerThread(model=str(llama_dir), adapter=lora_dir, calibration=cal_file, device="cpu", samples=K,
                          mode="letter", posterior_out=tmp_path / "post") as srv:
            info = httpx.get(srv.url + "/v1/posterior").json()
    recorded = json.loads((tmp_path / "post" / TFB_CONFIG_NAME).read_text())["fit_report"]
    assert info["fit_report"] == recorded and info["fit_report"]["sigma"] == info["sigma"]
    logged = [r for r in caplog.records if r.name == "server.loader" and "tfb fit report" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING  # 40 items: it warns
    assert FitReport.from_dict(recorded).table() in logged[0].getMessage()
    starts = [r.getMessage() for r in caplog.records if "calibration items from" in r.getMessage()]
    assert starts and "criterion cv-nll," in starts[0] and "<=" not in starts[0]  # cv-nll uses no eps
