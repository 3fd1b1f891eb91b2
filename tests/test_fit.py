"""tfb_core/fit.py beyond the search (issue 26): the scoring mode chosen by measurement, a given
sigma that keeps the calibration, and the calibration file's errors naming the file and line.

The expected mode is recomputed here from ``score_items`` at sigma 0 on the fitting half (its
accuracy, and the cross-fitted NLL of test_conformal.py's fold loop), never read from fit.py.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import fresh_base, mc_items
from test_conformal import hand_cv_nll

from tfb_core.cli import main
from tfb_core.conformal import holdout_split
from tfb_core.data import MCItem, write_jsonl
from tfb_core.errors import TFBError
from tfb_core.posterior import TFB_CONFIG_NAME, Posterior
from tfb_core.report import chance_margin
from tfb_core.scoring import score_items

N = 30
CANDIDATES = [("letter", False), ("sequence", False), ("sequence", True)]
FAST = dict(num_samples=2, sigma_grid=[0.01], progress=False)


@pytest.fixture(scope="module")
def items():
    return mc_items(N, seed=7)


@pytest.fixture(scope="module")
def p0(post, items):
    """Each candidate's sigma-0 model average on every item: {(mode, normalised): (N, C)}."""
    return {(m, n): score_items(post, items, mode=m, num_samples=1, sigma=0.0, length_normalize=n)[:, 0].double()
            for m, n in CANDIDATES}


def labelled_by(items, probs):
    return [replace(it, answer=int(p.argmax())) for it, p in zip(items, probs)]


def expected_mode(p0, labels, fit_idx):
    """(mode, normalised) with the best accuracy, then cross-fitted NLL, on the fitting half; and the numbers."""
    y = labels[fit_idx]
    numbers = {c: (float((p[fit_idx].argmax(-1) == y).double().mean()), hand_cv_nll(p[fit_idx], y))
               for c, p in p0.items()}
    return min(numbers, key=lambda c: (-numbers[c][0], numbers[c][1])), numbers


@pytest.mark.parametrize("truth", CANDIDATES)
def test_the_mode_is_chosen_by_accuracy_then_nll_on_the_fitting_half(post, items, p0, truth):
    data = labelled_by(items, p0[truth])
    labels = torch.tensor([it.answer for it in data])
    fit_idx, _ = holdout_split(N, 0.5, seed=0)
    want, numbers = expected_mode(p0, labels, fit_idx)
    assert numbers[truth][0] == 1.0  # the labels are this candidate's own answers
    result = post.fit(data, **FAST)
    report = result.report
    assert (report.mode, report.length_normalize, report.mode_choice) == (*want, "measured")
    assert (post.config.mode.value, post.config.length_normalize) == want
    measured = {(m.mode, m.length_normalize): (m.accuracy, m.nll) for m in report.modes}
    assert measured.keys() == numbers.keys()
    for c in numbers:
        assert measured[c][0] == pytest.approx(numbers[c][0], abs=1e-6), c
        assert measured[c][1] == pytest.approx(numbers[c][1], rel=1e-5), c
    assert result.mode == want[0]  # the search ran in it


def test_each_candidate_wins_when_the_answers_are_its_own(items, p0):
    """The test above is not trivial: the three labelings choose three different modes."""
    fit_idx, _ = holdout_split(N, 0.5, seed=0)
    chosen = {expected_mode(p0, torch.tensor([int(p.argmax()) for p in p0[c]]), fit_idx)[0] for c in CANDIDATES}
    assert chosen == set(CANDIDATES)


def test_a_given_mode_is_kept_and_at_chance_the_report_names_the_better_one(post, items, p0):
    data = labelled_by(items, p0[("sequence", False)])
    result = post.fit(data, mode="letter", **FAST)
    report = result.report
    assert (report.mode, report.mode_choice) == ("letter", "given")
    fit_idx, _ = holdout_split(N, 0.5, seed=0)
    letter_acc = report.accuracy_sigma
    assert letter_acc <= 0.25 + chance_margin(0.25, len(fit_idx))  # the premise: letter is at chance here
    warning = next(w for w in report.warnings if "near chance" in w)
    assert "pass --mode sequence" in warning and report.verdict.startswith("NOT READY")
    assert {(m.mode, m.length_normalize) for m in report.modes} == set(CANDIDATES)  # measured for the advice


def test_without_answers_letter_and_with_uneven_choices_sequence(post, items):
    unlabelled = [replace(it, answer=None) for it in items[:12]]
    assert post.fit(unlabelled, **FAST).report.mode == "letter"
    uneven = unlabelled[:6] + [MCItem(choices=["a", "b", "c"], question="three?")] + unlabelled[6:]
    report = post.fit(uneven, **FAST).report
    assert report.mode == "sequence" and "item 7 has 3 choices but item 1 has 4" in report.mode_choice


def test_uneven_choices_leave_letter_out_of_the_measured_candidates(post, items, p0):
    data = labelled_by(items, p0[("letter", False)])
    data[3] = replace(data[3], choices=data[3].choices[:3], answer=0)
    report = post.fit(data, **FAST).report
    assert {(m.mode, m.length_normalize) for m in report.modes} == {("sequence", False), ("sequence", True)}
    assert report.mode == "sequence"
    assert report.mode_note == "letter not a candidate: item 4 has 3 choices but item 1 has 4"
    assert report.mode_note in report.table()


# --- bad calibration files: one line naming the file and the line ------------------------------------


def bayesianize(llama_dir, lora_dir, calibration, out, *flags):
    return main(["bayesianize", "--model", str(llama_dir), "--adapter", str(lora_dir), "--calibration",
                 str(calibration), "--out", str(out), "--device", "cpu", *flags])


def test_letter_mode_with_uneven_choice_counts_names_the_file_and_line(tmp_path, llama_dir, lora_dir, capsys):
    path = tmp_path / "cal.jsonl"
    rows = [{"question": f"q{i}?", "choices": ["a", "b", "c", "d"], "answer": 0} for i in range(5)]
    rows[3]["choices"] = ["a", "b", "c"]
    path.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))  # a blank line 2
    assert bayesianize(llama_dir, lora_dir, path, tmp_path / "o", "--mode", "letter") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tfb bayesianize: error: {path}, line 5 has 3 choices but line 1 has 4: --mode letter needs "
                   f"the same number of choices (at most 26, labels A-Z) on every calibration item; pass --mode "
                   f"sequence, or leave --mode out and tfb chooses the mode"]
    assert not (tmp_path / "o").exists()


def test_the_start_up_search_refuses_letter_mode_on_uneven_choices(tmp_path, llama_dir, lora_dir):
    from test_calibration import start_fails

    path = tmp_path / "cal.jsonl"
    rows = [{"question": f"q{i}?", "choices": ["a", "b", "c", "d"][:4 - (i == 2)]} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    start_fails(f"{path}, line 3 has 3 choices but line 1 has 4: --mode letter needs", model=str(llama_dir),
                adapter=lora_dir, calibration=path, mode="letter", posterior_out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_lora_for_another_base_model_names_the_module(tmp_path, llama_dir, gpt2_lora_dir, capsys):
    import tiny

    path = tmp_path / "cal.jsonl"
    write_jsonl(mc_items(4, seed=1, answers=False), path)
    assert bayesianize(llama_dir, gpt2_lora_dir, path, tmp_path / "o", "--sigma", "0.01") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "the adapter was made for another base model: module transformer.h.0.attn.c_attn " \
        "does not exist in this one" in err[0] and str(gpt2_lora_dir) in err[0]
    # the same module names, other shapes: a LoRA of a wider Llama
    wide = tiny.make_llama(tmp_path / "wide", hidden=128)
    wide_lora = tiny.make_lora(wide, tmp_path / "wide_lora", targets=("q_proj",))
    assert bayesianize(llama_dir, wide_lora, path, tmp_path / "o", "--sigma", "0.01") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "another base model: module model.layers.0.self_attn.q_proj has lora_A (4, 128)" in err[0]
    assert not (tmp_path / "o").exists()


# --- a given sigma keeps the calibration ---------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory, items, p0):
    path = tmp_path_factory.mktemp("labelled") / "cal.jsonl"
    write_jsonl(labelled_by(items, p0[("letter", False)]), path)
    return path


def test_a_given_sigma_still_fits_t_the_confidence_and_the_held_out_calibration(labelled_file, items, p0,
                                                                                llama_dir, lora_dir, tmp_path,
                                                                                capsys):
    out = tmp_path / "post"
    assert bayesianize(llama_dir, lora_dir, labelled_file, out, "--sigma", "0.02", "--samples", "2") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = json.loads((out / TFB_CONFIG_NAME).read_text())
    assert cfg["sigma"] == 0.02 and cfg["criterion"] is None and cfg["search_trace"] == []
    assert cfg["mode"] == "letter"  # measured: the answers are letter mode's own
    fit_idx, held_idx = holdout_split(N, 0.5, seed=0)
    assert printed["held_out"] == len(held_idx) == len(cfg["calibration"]["scores"])
    assert cfg["confidence"] is not None and cfg["fit_report"]["criterion"] is None
    # T: fitted on the fitting half at the given sigma, recomputed here
    from tfb_core.uncertainty import fit_temperature

    post = Posterior.load(fresh_base(llama_dir), out)
    fit = [labelled_by(items, p0[("letter", False)])[i] for i in fit_idx]
    avg = score_items(post, fit, num_samples=2, seed=0).double().mean(1)
    assert cfg["temperature"] == pytest.approx(fit_temperature(avg, torch.tensor([it.answer for it in fit])), rel=1e-6)
    assert cfg["temperature"] != 1.0


@pytest.mark.parametrize("flags,temperature_fitted,held_out", [
    (["--no-temperature"], False, 15),
    (["--holdout", "0"], True, 0),
])
def test_a_given_sigma_honours_no_temperature_and_holdout_0(labelled_file, llama_dir, lora_dir, tmp_path, capsys,
                                                            flags, temperature_fitted, held_out):
    out = tmp_path / "post"
    assert bayesianize(llama_dir, lora_dir, labelled_file, out, "--sigma", "0.02", "--samples", "2",
                       "--mode", "letter", *flags) == 0
    capsys.readouterr()
    cfg = json.loads((out / TFB_CONFIG_NAME).read_text())
    assert (cfg["temperature"] != 1.0) == temperature_fitted
    assert (len(cfg["calibration"]["scores"]) if cfg["calibration"] else 0) == held_out
    assert cfg["fit_report"]["fit_items"] == N - held_out


def test_a_given_sigma_of_0_with_labels_warns(labelled_file, llama_dir, lora_dir, tmp_path, capsys):
    assert bayesianize(llama_dir, lora_dir, labelled_file, tmp_path / "post", "--sigma", "0", "--samples", "2",
                       "--mode", "letter") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["warnings"][0].startswith("sigma = 0: the posterior adds no uncertainty")
    assert "--sigma" in printed["warnings"][0] and printed["verdict"].startswith("NOT READY")


# --- bayesianize: the one verb that fits, saves and caches ------------------------------------------


def changed(f):
    """A valid value of SearchConfig field ``f`` other than its default."""
    import enum

    from tfb_core.options import Mode

    default = f.default
    if isinstance(default, enum.Enum):
        return next(m for m in type(default) if m is not default)
    if isinstance(default, bool):
        return not default
    if default is None:
        return {"sigma_grid": (0.0, 0.01), "mode": Mode.SEQUENCE, "length_normalize": True, "holdout": 0.3}[f.name]
    if f.name == "stochastic_layers":  # "all" by default
        return 2
    return default + 1 if isinstance(default, int) else default / 2


def test_the_fit_key_covers_every_search_setting(llama_dir, lora_dir, tmp_path, items):
    """The key hashes ``asdict(config)``: every SearchConfig field, this one included when a new
    one is added, changes it; so do a given sigma and the calibration file; the same inputs give
    the same key."""
    import dataclasses

    from tfb_core.posterior import fit_key
    from tfb_core.options import SearchConfig

    cal = tmp_path / "cal.jsonl"
    write_jsonl(items, cal)
    key = fit_key(llama_dir, lora_dir, cal, SearchConfig(), device="cpu")
    assert key == fit_key(llama_dir, lora_dir, cal, SearchConfig(), device="cpu")
    keys = {f.name: fit_key(llama_dir, lora_dir, cal, replace(SearchConfig(), **{f.name: changed(f)}), device="cpu")
            for f in dataclasses.fields(SearchConfig)}
    assert [name for name, k in keys.items() if k == key] == []
    assert fit_key(llama_dir, lora_dir, cal, SearchConfig(), sigma=0.01, device="cpu") != key
    write_jsonl(items[1:], cal)
    assert fit_key(llama_dir, lora_dir, cal, SearchConfig(), device="cpu") != key


def test_bayesianize_fits_once_per_inputs_and_checks_labels_before_loading(llama_dir, lora_dir, tmp_path, items):
    """With a cache, the same inputs are fitted once and then loaded (the same posterior); other
    settings fit again. A labelled criterion on an unlabelled file fails before any model loads,
    naming the flag, the file and the line."""
    from tfb_core.posterior import bayesianize
    from tfb_core.options import SearchConfig

    cal = tmp_path / "cal.jsonl"
    write_jsonl(items[:12], cal)
    config = SearchConfig(num_samples=2, sigma_grid=(0.0, 0.01), mode="letter", holdout=0.0)
    fits = []

    def fit(cfg):
        return bayesianize(llama_dir, lora_dir, cal, cfg, cache=tmp_path / "cache", device="cpu", progress=False,
                           on_fit=lambda what: fits.append(cfg))

    first, again = fit(config), fit(config)
    assert fits == [config]
    assert again.sigma == first.sigma and again.config.fit_report == first.config.fit_report
    fit(replace(config, seed=1))
    assert len(fits) == 2 and len(list((tmp_path / "cache" / "posteriors").iterdir())) == 2

    write_jsonl([replace(it, answer=None) if i == 2 else it for i, it in enumerate(items[:12])], cal)
    with pytest.raises(TFBError, match=f"--criterion cv-nll needs an 'answer' on every calibration item; {cal}, "
                                       f"line 3 has no 'answer'"):
        fit(replace(config, criterion="cv-nll"))
    assert len(fits) == 2
