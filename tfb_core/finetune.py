"""MLE LoRA training for multiple-choice data: the adapter that TFB then Bayesianizes.

The loss is the cross-entropy of the gold answer under the answer distribution of the scoring
mode (docs/method.md §3), so training optimises exactly what ``tfb eval`` and the search score:

- ``letter``: the next-token logits at the last prompt position, restricted to the label tokens;
- ``sequence``: the summed log-likelihood of each choice's tokens, softmax over the choices.

CPU: load the base in bfloat16 and keep the LoRA in float32 (~3x faster here than float32).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .artifacts import FINETUNE_LOG_NAME, Inputs, check_output_dir, write_output_dir
from .data import MCItem
from .errors import TFBError
from .encoding import Encoded, encode_item
from .models import max_context
from .options import Mode, parse_mode
from .scoring import right_pad

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class FinetuneConfig:
    """What ``tfb finetune`` trains; written next to the adapter as ``finetune.json``."""

    mode: str = "letter"
    chat: bool = False
    length_normalize: bool = False
    rank: int = 4
    alpha: float = 8.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0
    lr: float = 5e-4
    weight_decay: float = 0.0
    epochs: float = 4.0
    batch_size: int = 16
    warmup_steps: int = 30
    seed: int = 0
    time_budget_s: float | None = None  # stop (and save) after this many seconds of training


@dataclass
class EpochLog:
    epoch: float
    step: int
    train_loss: float
    heldout_acc: float | None
    heldout_nll: float | None
    seconds: float
    skipped_steps: int = 0


def answer_scores(model, encoded: Sequence[Encoded]) -> list[torch.Tensor]:
    """Unnormalised answer log-scores per item, with gradients: a list of (C_i,) tensors.

    One forward over every sequence of every item (letter: 1 per item; sequence: one per
    choice). Rows are RIGHT-padded: with left padding the pad positions attend to nothing, and
    on CUDA their NaN attention rows poison the backward pass.
    """
    rows = [seq for enc in encoded for seq in enc.sequences]
    device = next(model.parameters()).device
    ids, mask = right_pad(rows)
    # (row, position, token) of every log-probability a score needs
    where, row = [], 0
    for enc in encoded:
        if enc.mode is Mode.LETTER:
            n = len(rows[row])
            where += [(row, n - 1, t) for t in enc.targets[0]]
            row += 1
            continue
        for cont in enc.targets:
            n = len(rows[row])
            where += [(row, p, t) for p, t in zip(range(n - len(cont) - 1, n - 1), cont)]
            row += 1
    r_idx, p_idx, t_idx = (torch.tensor(x, device=device) for x in zip(*where))
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    lp = torch.log_softmax(logits[r_idx, p_idx].float(), -1).gather(1, t_idx[:, None]).squeeze(1)  # (M,)
    out, i = [], 0
    for enc in encoded:
        if enc.mode is Mode.LETTER:
            c = len(enc.targets[0])
            out.append(lp[i:i + c])
            i += c
            continue
        scores = []
        for cont in enc.targets:
            s = lp[i:i + len(cont)].sum()
            scores.append(s / len(cont) if enc.length_normalize else s)
            i += len(cont)
        out.append(torch.stack(scores))
    return out


def batch_loss(model, encoded: Sequence[Encoded], labels: Sequence[int]) -> torch.Tensor:
    """Mean cross-entropy of the gold answers over the answer distribution."""
    scores = answer_scores(model, encoded)
    return torch.stack([-torch.log_softmax(s, -1)[y] for s, y in zip(scores, labels)]).mean()


@torch.no_grad()
def heldout_metrics(model, encoded: Sequence[Encoded], labels: Sequence[int], batch_size: int) -> tuple[float, float]:
    """(accuracy, NLL) of the deterministic model on held-out items."""
    was_training = model.training
    model.eval()
    correct, nll = 0, 0.0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        for s, y in zip(answer_scores(model, chunk), labels[start:start + batch_size]):
            lp = torch.log_softmax(s.double(), -1)
            correct += int(lp.argmax().item() == y)
            nll -= lp[y].item()
    model.train(was_training)
    return correct / len(encoded), nll / len(encoded)


def finetune(base, items: Sequence[MCItem], out: str | Path, config: FinetuneConfig | None = None,
             heldout: Sequence[MCItem] | None = None, progress: bool = True, *, force: bool = False,
             inputs: Inputs = (), flag: str = "output directory") -> list[EpochLog]:
    """Train a LoRA on ``base`` (a :class:`tfb_core.models.BaseModel`) and save it to ``out``.

    Parameters
    ----------
    items : sequence of MCItem
        Training questions; every one needs an ``answer``.
    config : FinetuneConfig, default=FinetuneConfig()
    heldout : sequence of MCItem, default=None
        Scored (accuracy, NLL) after every epoch.
    force, inputs : default=False, ()
        ``out`` must be new or empty, or hold a previous tfb output with ``force``, and never
        overlap an input (the rule of :mod:`tfb_core.artifacts`); checked before training.

    Returns the per-epoch log; ``out`` holds a peft adapter directory plus ``finetune.json``.
    The base model is modified in place (peft wraps its layers).
    """
    from peft import LoraConfig, get_peft_model

    cfg = config or FinetuneConfig()
    mode = parse_mode(cfg.mode)
    check_output_dir(out, force=force, inputs=inputs, flag=flag)
    if not items:
        raise TFBError("no training items")
    if any(it.answer is None for it in items):
        raise TFBError("every training item needs an 'answer'")
    if cfg.epochs <= 0 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise TFBError(f"epochs, batch_size and lr must be positive (got {cfg.epochs}, {cfg.batch_size}, {cfg.lr})")
    tok, limit = base.tokenizer, max_context(base.model)
    enc = [encode_item(tok, it, mode, cfg.chat, cfg.length_normalize, limit) for it in items]
    labels = [it.answer for it in items]
    held_enc = [encode_item(tok, it, mode, cfg.chat, cfg.length_normalize, limit) for it in heldout or []]
    held_labels = [it.answer for it in heldout or []]

    torch.manual_seed(cfg.seed)
    model = get_peft_model(base.model, LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), lora_dropout=cfg.dropout,
        bias="none", task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # LoRA weights in float32 even on a bf16 base
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(enc) / cfg.batch_size)
    total = max(1, round(cfg.epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps))
                                              * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    rng = random.Random(cfg.seed)
    history: list[EpochLog] = []
    start, step, running, seen, skipped = time.perf_counter(), 0, 0.0, 0, 0
    bar = tqdm(total=total, desc="finetune", unit="step", disable=not progress)
    model.train()
    stop = False
    while step < total and not stop:
        order = list(range(len(enc)))
        rng.shuffle(order)
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            loss = batch_loss(model, [enc[i] for i in idx], [labels[i] for i in idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if torch.isfinite(loss) and torch.isfinite(norm):
                opt.step()
                running += loss.item() * len(idx)
                seen += len(idx)
            else:  # a non-finite loss or gradient: skip the update, never poison the weights
                skipped += 1
                log.warning("step %d: non-finite loss or gradient (%s, %s); update skipped", step, loss.item(), norm.item())
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            over_time = cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s
            if step >= total or over_time:
                stop = over_time
                break
        acc, nll = heldout_metrics(model, held_enc, held_labels, cfg.batch_size) if held_enc else (None, None)
        history.append(EpochLog(epoch=round(step / steps_per_epoch, 3), step=step, train_loss=running / max(seen, 1),
                                heldout_acc=acc, heldout_nll=nll, seconds=round(time.perf_counter() - start, 1),
                                skipped_steps=skipped))
        log.info("epoch %.2f step %d train_loss %.4f heldout_acc %s heldout_nll %s (%.0f s)",
                 history[-1].epoch, step, history[-1].train_loss, acc, nll, history[-1].seconds)
        if progress:
            tqdm.write(f"epoch {history[-1].epoch:.2f}: train loss {history[-1].train_loss:.4f}"
                       + (f", held-out acc {acc:.3f}, NLL {nll:.3f}" if acc is not None else ""))
        running, seen = 0.0, 0
    bar.close()
    if stop:
        log.warning("time budget of %.0f s reached after %d of %d steps", cfg.time_budget_s, step, total)
    record = {"config": asdict(cfg), "train_items": len(enc), "steps": step, "planned_steps": total,
              "history": [asdict(h) for h in history]}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        (tmp / FINETUNE_LOG_NAME).write_text(json.dumps(record, indent=2))

    write_output_dir(out, write, force=force, inputs=inputs, flag=flag)
    return history
