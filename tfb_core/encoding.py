"""Multiple-choice items as token ids: the tokenizer's side of scoring, no model code.

:func:`encode_item` renders an item's prompt (:func:`render_prompt`, through the chat template
with :func:`apply_chat`), tokenizes it and finds what is scored after it: the label tokens A, B,
... (letter mode) or each choice's tokens (sequence mode). The API process tokenizes requests
with it; it imports no torch, so that process need not load the model side to tokenize.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .data import LABELS, MCItem, letter_limit, letter_prompt, sequence_prompt
from .errors import TFBError
from .options import Mode, parse_mode

__all__ = ["LABELS", "Encoded", "apply_chat", "encode_item", "label", "letter_limit", "render_prompt"]


def label(index: int) -> str:
    """Choice ``index``'s label: A, B, ... Z, then its number."""
    return LABELS[index] if index < len(LABELS) else str(index)


@dataclass
class Encoded:
    """One item as token ids: a prompt (letter) or a prompt per choice (sequence)."""

    sequences: list[list[int]]  # letter: [prompt]; sequence: [prompt + choice_c for each c]
    targets: list[list[int]]  # letter: [label token ids]; sequence: per choice, its token ids
    mode: Mode
    length_normalize: bool = False

    @property
    def num_choices(self) -> int:
        return len(self.targets[0]) if self.mode is Mode.LETTER else len(self.targets)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def render_prompt(tokenizer, item: MCItem, mode: Mode, chat: bool = False) -> str:
    """The text the model sees before the answer."""
    if item.prompt is not None:
        text = item.prompt
    elif mode is Mode.LETTER:
        text = letter_prompt(item.question, item.choices)
    else:
        text = sequence_prompt(item.question)
    if chat:
        return apply_chat(tokenizer, [{"role": "user", "content": text}])
    return text


def apply_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TFBError("this model's tokenizer has no chat template; send a plain prompt")
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise TFBError(f"the model's chat template rejected the messages: {e}") from None


def encode_item(tokenizer, item: MCItem, mode: Mode | str = Mode.LETTER, chat: bool = False,
                length_normalize: bool = False, max_length: int | None = None,
                prompt_text: str | None = None) -> Encoded:
    """Tokenize one item; ``prompt_text`` overrides the rendered prompt (e.g. chat messages)."""
    mode = parse_mode(mode)
    problem = letter_limit(len(item.choices)) if mode is Mode.LETTER else None
    if problem:  # before the prompt lists them
        raise TFBError(problem)
    text = prompt_text if prompt_text is not None else render_prompt(tokenizer, item, mode, chat)
    special = not (chat or prompt_text is not None)  # a chat template carries its own specials
    prompt_ids = tokenizer(text, add_special_tokens=special).input_ids
    if max_length is not None and len(prompt_ids) > max_length:  # before it is tokenized again per label
        raise TFBError(f"the prompt is {len(prompt_ids)} tokens long; the model's context is {max_length} tokens")
    sep = "" if text[-1:].isspace() else " "
    if mode is Mode.LETTER:
        labels = _label_tokens(tokenizer, text, prompt_ids, LABELS[:len(item.choices)], sep, special)
        enc = Encoded([prompt_ids], [labels], mode)
    else:
        conts = [tokenizer(sep + choice, add_special_tokens=False).input_ids for choice in item.choices]
        enc = Encoded([prompt_ids + c for c in conts], conts, mode, length_normalize)
    longest = max(len(s) for s in enc.sequences)
    if max_length is not None and longest > max_length:
        raise TFBError(f"the prompt is {longest} tokens long; the model's context is {max_length} tokens")
    return enc


def _label_tokens(tokenizer, text: str, prompt_ids: list[int], labels: Sequence[str], sep: str,
                  special: bool) -> list[int]:
    """The single token the model emits for each label after the prompt (with ``sep``, else
    the other spacing; tested by tokenizing prompt + label, all labels in one batched call)."""
    found: dict[str, int] = {}
    for s in dict.fromkeys((sep, " " if sep == "" else "")):
        missing = [label for label in labels if label not in found]
        if not missing:
            break
        for label, ids in zip(missing, tokenizer([text + s + label for label in missing],
                                                 add_special_tokens=special).input_ids):
            if len(ids) == len(prompt_ids) + 1 and ids[:-1] == prompt_ids:
                found[label] = ids[-1]
    for label in labels:
        if label not in found:
            raise TFBError(f"the label {label!r} is not a single token after this prompt for this tokenizer; "
                           f"use mode 'sequence'")
    return [found[label] for label in labels]
