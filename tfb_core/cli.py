"""The ``tfb`` command line: ``bayesianize`` (here) and the commands other packages register.

``tfb_core`` never imports ``server``: the console script is ``server.cli:main``, which adds
``serve`` to this parser. Errors in user input print one line naming what was wrong and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from .errors import TFBError

DEFAULT_MODEL = "smollm2-135m"

# name -> (add_arguments(parser), run(args) -> int); filled by register_command
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def register_command(name: str, help: str, add_arguments: Callable, run: Callable) -> None:
    COMMANDS[name] = (help, add_arguments, run)


def add_model_arguments(p: argparse.ArgumentParser, adapter_required: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a local Hugging Face model directory or a built-in name (default: {DEFAULT_MODEL})")
    p.add_argument("--adapter", required=adapter_required, help="a peft LoRA adapter directory")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--criterion", default="nll", choices=["nll", "accuracy"])
    p.add_argument("--eps", type=float, default=0.003, help="tolerance of the criterion (default: 0.003)")
    p.add_argument("--samples", type=int, default=10, help="K weight samples (default: 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="letter", choices=["letter", "sequence"])
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--gold-labels", action="store_true", help="search against the items' answers, not pseudo-labels")
    p.add_argument("--batch-size", type=int, default=8, help="items per forward (default: 8)")


def _add_bayesianize(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--calibration", help="calibration JSONL (question/prompt, choices, optional answer)")
    p.add_argument("--out", required=True, help="the Bayesianized adapter directory to write")
    p.add_argument("--sigma", type=float, default=None, help="skip the search and use this sigma")
    add_search_arguments(p)


def _run_bayesianize(args) -> int:
    from .data import read_jsonl
    from .models import load_base_model
    from .posterior import Posterior

    if args.sigma is None and not args.calibration:
        raise TFBError("--calibration FILE is required unless --sigma is given")
    if args.sigma is not None and args.sigma < 0:
        raise TFBError(f"--sigma must be >= 0, got {args.sigma}")
    items = read_jsonl(args.calibration) if args.calibration else None
    # float32 unless asked: in bf16 any perturbation moves the NLL by ~1% (TFB_SPEC §4)
    base = load_base_model(args.model, device=args.device, dtype=args.dtype or "float32")
    post = Posterior.from_adapter(base, args.adapter, num_samples=args.samples, seed=args.seed,
                                  mode=args.mode)
    if args.sigma is not None:
        post.sigma = args.sigma
    else:
        result = post.search(items, criterion=args.criterion, eps=args.eps, num_samples=args.samples,
                             seed=args.seed, mode=args.mode, gold_labels=args.gold_labels,
                             chat=args.chat, batch_size=args.batch_size)
        for point in result.trace:
            logging.info("sigma=%.6g value=%.6g feasible=%s", point.sigma, point.value, point.feasible)
    out = post.save(args.out, calibration_file=args.calibration)
    print(json.dumps({"out": str(out), "sigma": post.sigma, "criterion": post.config.criterion,
                      "eps": post.config.eps, "modules": len(post.layers)}))
    return 0


register_command("bayesianize", "turn a LoRA adapter into a TFB posterior (variance search)",
                 _add_bayesianize, _run_bayesianize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tfb", description="Training-free Bayesian LoRA: "
                                     "LLM answers with honest uncertainty")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command][2](args) or 0
    except TFBError as e:
        print(f"tfb {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
