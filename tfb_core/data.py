"""Multiple-choice items: the JSONL file format and the prompt templates.

A calibration or evaluation file is JSONL, one item a line::

    {"question": "Which gas do plants absorb?", "choices": ["Oxygen", "Carbon dioxide"], "answer": 1}

- ``question`` (str) or ``prompt`` (str, a pre-formatted prompt used as it is); one is required.
- ``choices``: two or more distinct non-empty strings.
- ``answer`` (optional): the index of the correct choice, its label (``"B"``) or its text.
- ``id`` (optional, a string or an integer): the item's name in per-item reports.
- Any other field (``"source"``, ``"subject"``, ...) is kept as the item's ``metadata`` and
  ignored by scoring; one warning per file names such fields. A field that looks like a
  misspelt known one (``anwser``, ``choice``, ``questoin``) while that field is missing is an
  error suggesting the right name.
Blank lines are skipped. A bad line is an error naming the file, the line and the problem.
"""

from __future__ import annotations

import difflib
import json
import logging
import string
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TFBError

log = logging.getLogger(__name__)

LABELS = string.ascii_uppercase


def letter_limit(choices: int) -> str | None:
    """Why letter mode cannot label ``choices`` choices (more than the labels A-Z), or None."""
    if choices > len(LABELS):
        return f"letter mode allows at most {len(LABELS)} choices (labels A-Z), got {choices}"
    return None
FIELDS = ("question", "prompt", "choices", "answer", "id")
LETTER_INSTRUCTION = "Return the label of the correct answer for the question below."


@dataclass
class MCItem:
    """One multiple-choice question."""

    choices: list[str]
    question: str | None = None
    prompt: str | None = None  # pre-formatted; wins over question
    answer: int | None = None
    id: str | int | None = None
    metadata: dict = field(default_factory=dict)  # the file's other fields; never scored
    line: int | None = field(default=None, compare=False, repr=False)  # its line in the file read

    def __post_init__(self):
        check_item(self.question, self.prompt, self.choices, self.answer)
        if self.id is not None and (isinstance(self.id, bool) or not isinstance(self.id, (str, int))):
            raise TFBError(f"'id' must be a string or an integer, got {self.id!r}")


def check_item(question, prompt, choices, answer) -> None:
    if prompt is None and question is None:
        raise TFBError("an item needs 'question' or 'prompt'")
    text = prompt if prompt is not None else question
    if not isinstance(text, str) or not text.strip():
        raise TFBError("'question'/'prompt' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise TFBError("'choices' must be a list of at least 2 strings")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise TFBError("every choice must be a non-empty string")
    if len(set(choices)) != len(choices):
        raise TFBError("'choices' must be distinct")
    if answer is not None and not (isinstance(answer, int) and 0 <= answer < len(choices)):
        raise TFBError(f"'answer' must be a choice index in [0, {len(choices) - 1}]")


def parse_answer(answer, choices: list[str]) -> int | None:
    """An index, a label ("B") or the text of a choice -> the index."""
    if answer is None:
        return None
    if isinstance(answer, bool):
        raise TFBError(f"'answer' {answer!r} is not an index, a label or a choice")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise TFBError(f"'answer' {answer} is out of range: allowed 0..{len(choices) - 1}")
        return answer
    if isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        label = answer.strip().upper()
        if len(label) == 1 and label in LABELS[: len(choices)]:
            return LABELS.index(label)
    raise TFBError(f"'answer' {answer!r} is not an index, a label (A..{LABELS[len(choices) - 1]}) "
                   f"or the text of a choice")


def item_from_dict(data) -> MCItem:
    if not isinstance(data, dict):
        raise TFBError("expected a JSON object")
    extra = {k: v for k, v in data.items() if k not in FIELDS}
    for name in extra:
        meant = misspelt_field(name, data)
        if meant:
            raise TFBError(f"unknown field {name!r}: did you mean {meant!r}? (fields: {', '.join(FIELDS)}; "
                           f"any other field is kept as metadata)")
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise TFBError("'choices' must be a list of at least 2 strings")
    return MCItem(choices=choices, question=data.get("question"), prompt=data.get("prompt"),
                  answer=parse_answer(data.get("answer"), choices), id=data.get("id"), metadata=extra)


def misspelt_field(name: str, data: dict) -> str | None:
    """The known field ``name`` looks like a misspelling of, when that field is absent."""
    if name in FIELDS:
        return None
    close = difflib.get_close_matches(name.lower(), FIELDS, n=1, cutoff=0.82)
    return close[0] if close and close[0] not in data else None


def read_jsonl(path: str | Path) -> list[MCItem]:
    """Read a calibration/evaluation file; errors name the file and the line."""
    lines: list[int] = []
    items = read_records(path, item_from_dict, lines)
    for item, lineno in zip(items, lines):
        item.line = lineno
    extra = dict.fromkeys(k for it in items for k in it.metadata)
    if extra:
        log.warning("%s: field(s) %s are not used by tfb; kept as each item's metadata", path,
                    ", ".join(repr(k) for k in extra))
    return items


def read_records(path: str | Path, parse, lines: list[int] | None = None) -> list:
    """``parse(obj)`` of every non-empty line of a JSONL file; errors name the file and the line.

    ``lines``, when given, receives each record's line number (1-based).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise TFBError(f"{path}: no such file")
    items = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:  # decoded per line, so that a bad byte is reported with its line
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise TFBError(f"{path}, line {lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                items.append(parse(json.loads(line)))
                if lines is not None:
                    lines.append(lineno)
            except json.JSONDecodeError as e:
                raise TFBError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
            except TFBError as e:
                raise TFBError(f"{path}, line {lineno}: {e}") from None
    if not items:
        raise TFBError(f"{path}: no items")
    return items


def write_jsonl(items: list[MCItem], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            row = {**item.metadata, "choices": item.choices, "answer": item.answer}
            row["prompt" if item.prompt is not None else "question"] = item.prompt or item.question
            if item.id is not None:
                row["id"] = item.id
            f.write(json.dumps(row) + "\n")


def letter_prompt(question: str, choices: list[str]) -> str:
    """The paper's prompt (docs/method.md §3)."""
    lines = [f"{LABELS[i]}) {c}" for i, c in enumerate(choices)]
    return f"{LETTER_INSTRUCTION}\n\nQuestion: {question}\nChoices:\n" + "\n".join(lines) + "\nAnswer:"


def sequence_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"
