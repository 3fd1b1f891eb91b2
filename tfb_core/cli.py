"""The ``tfb`` command line: ``bayesianize`` (here) and the commands other packages register.

``tfb_core`` never imports ``server``: the console script is ``server.cli:main``, which adds
``serve`` to this parser. Errors in user input print one line naming what was wrong and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from .demo import DEMO_MODEL
from .errors import TFBError
from .options import Mode

# name -> (add_arguments(parser), run(args) -> int); filled by register_command
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def register_command(name: str, help: str, add_arguments: Callable, run: Callable) -> None:
    COMMANDS[name] = (help, add_arguments, run)


def add_model_arguments(p: argparse.ArgumentParser, adapter_required: bool = True) -> None:
    p.add_argument("--model", default=DEMO_MODEL,
                   help=f"a local Hugging Face model directory or a built-in name (default: {DEMO_MODEL})")
    p.add_argument("--adapter", required=adapter_required, help="a peft LoRA adapter directory")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`tfb_core.fit.SearchConfig` field, with its help, default and choices."""
    import dataclasses
    import enum
    import typing

    from .options import SearchConfig

    hints = typing.get_type_hints(SearchConfig)
    for f in dataclasses.fields(SearchConfig):
        flag, default = SearchConfig.flag(f.name), f.default
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        if isinstance(default, bool):  # --x turns on a False default, --no-x turns off a True one
            p.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=f.metadata["help"])
            continue
        if kind is bool:  # None: chosen by tfb; --x / --no-x decide
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f.metadata["help"])
            continue
        kw: dict = dict(dest=f.name, default=default)
        if isinstance(default, enum.Enum) or (isinstance(kind, type) and issubclass(kind, enum.Enum)):
            kw.update(default=getattr(default, "value", default), choices=[m.value for m in kind])
        elif typing.get_origin(kind) is tuple:
            kw.update(type=_floats)
        else:
            kw.update(type=kind)
        if "choices" not in kw:
            kw["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        shown = "" if default is None else f" (default: {kw['default']})"
        p.add_argument(flag, help=f.metadata["help"] + shown, **kw)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def search_config(args):
    """The :class:`tfb_core.fit.SearchConfig` of the flags above."""
    import dataclasses

    from .options import SearchConfig

    return SearchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SearchConfig)})


FORCE_HELP = ("replace --out when it holds a previous tfb output (never a directory holding anything "
              "else, an input, or the current directory)")


def add_out_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", required=True, help=f"the {what} directory to write: new or empty (written "
                   f"atomically), or a previous tfb output with --force")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def _add_bayesianize(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--calibration", help="calibration JSONL (question/prompt, choices, optional answer)")
    add_out_arguments(p, "Bayesianized adapter")
    p.add_argument("--sigma", type=float, default=None, help="skip the search and use this sigma; with "
                   "--calibration, T, the confidence and the held-out calibration are still fitted on its "
                   "answers (unless --no-temperature / --holdout 0)")
    add_search_arguments(p)


def _run_bayesianize(args) -> int:
    from .posterior import FIT_DTYPE, bayesianize

    config = search_config(args)  # bad values fail before the model loads
    # float32 unless asked: in bf16 any perturbation moves the NLL by ~1% (docs/method.md §4)
    dtype = args.dtype or FIT_DTYPE
    post = bayesianize(args.model, args.adapter, args.calibration, config, sigma=args.sigma, out=args.out,
                       force=args.force, device=args.device, dtype=dtype, fit_dtype=dtype)
    for point in post.config.search_trace:
        logging.info("sigma=%.6g value=%.6g feasible=%s", point["sigma"], point["value"], point["feasible"])
    out = Path(args.out).expanduser().resolve()
    cal, report = post.config.conformal, post.config.fit_report
    print(json.dumps({"out": str(out), "sigma": post.sigma, "criterion": post.config.criterion,
                      "temperature": post.config.temperature, "eps": post.config.eps,
                      "held_out": cal.n if cal else 0, "modules": len(post.layers),
                      "verdict": report["verdict"] if report else None,
                      "warnings": report["warnings"] if report else []}), flush=True)
    if report:  # the human's table last, on stderr: stdout's last line stays the JSON above
        from .report import FitReport

        print(FitReport.from_dict(report).table(), file=sys.stderr)
    return 0


register_command("bayesianize", "turn a LoRA adapter into a TFB posterior (variance search)",
                 _add_bayesianize, _run_bayesianize)


def _add_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEMO_MODEL,
                   help=f"a local Hugging Face model directory or a built-in name (default: {DEMO_MODEL})")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument("--dtype", default="bfloat16",
                   help="base weights' dtype; the LoRA is float32 (default: bfloat16, ~3x faster on CPU)")
    p.add_argument("--data", required=True,
                   help="training items: JSONL files or built-in names, comma-separated (e.g. arc_easy:test,arc_challenge:test)")
    p.add_argument("--heldout", default=None, help="items scored after every epoch (file or built-in name)")
    add_out_arguments(p, "adapter")
    p.add_argument("--mode", default=Mode.LETTER.value, choices=[m.value for m in Mode])
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names to adapt")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None, help="stop and save after this many seconds")
    p.add_argument("--limit", type=int, default=None, help="use the first N training items")


def _run_finetune(args) -> int:
    from . import benchmarks
    from .artifacts import check_output_dir
    from .finetune import FinetuneConfig, finetune
    from .models import check_model, load_base_model

    names = [name.strip() for name in args.data.split(",") if name.strip()]
    inputs = [("--model", args.model), *(("--data", name) for name in names), ("--heldout", args.heldout)]
    check_model(args.model)
    check_output_dir(args.out, force=args.force, inputs=inputs, flag="--out")
    items = [it for name in names for it in benchmarks.load(name)]
    items = items[:args.limit] if args.limit else items
    heldout = benchmarks.load(args.heldout) if args.heldout else None
    cfg = FinetuneConfig(mode=args.mode, chat=args.chat, rank=args.rank, alpha=args.alpha,
                         targets=[t for t in args.targets.split(",") if t], lr=args.lr, epochs=args.epochs,
                         batch_size=args.batch_size, seed=args.seed, time_budget_s=args.time_budget)
    base = load_base_model(args.model, device=args.device, dtype=args.dtype)
    history = finetune(base, items, args.out, cfg, heldout=heldout, force=args.force, inputs=inputs, flag="--out")
    print(json.dumps({"out": args.out, "epochs": [h.__dict__ for h in history]}))
    return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"base model (default: the built-in demo, {DEMO_MODEL})")
    p.add_argument("--adapter", default=None,
                   help="a Bayesianized directory or a plain LoRA (default: the built-in demo posterior)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument("--dtype", default="float32", help="default float32: bf16 rounding sets a noise floor")
    p.add_argument("--data", required=True, help="JSONL file or built-in name (arc_easy, arc_challenge, "
                   "openbookqa, piqa, hellaswag, winogrande, boolq, sst2; suffix :test for a test split)")
    p.add_argument("--mode", default=None, choices=[m.value for m in Mode], help="default: the posterior's")
    p.add_argument("--chat", default=None, action=argparse.BooleanOptionalAction,
                   help="chat template around prompts (default: the posterior's)")
    p.add_argument("--samples", type=int, default=None, help="K weight samples (default: the posterior's)")
    p.add_argument("--sigma", type=float, default=None, help="override the posterior's sigma")
    p.add_argument("--temperature", type=float, default=None, help="override the posterior's temperature")
    p.add_argument("--length-normalize", default=None, action=argparse.BooleanOptionalAction,
                   help="mean log-probability per token in sequence mode (default: the posterior's)")
    p.add_argument("--coverage", action="store_true",
                   help="report the prediction sets' coverage and size at 0.8, 0.9, 0.95 and the "
                        "abstention's risk (needs a posterior with a held-out calibration)")
    p.add_argument("--max-risk", type=float, default=None, help="abstention target (default: the posterior's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ood", default=None, help="out-of-distribution items (file or built-in name)")
    p.add_argument("--json", default=None, help="write the report as JSON here (a previous file is replaced; "
                   "never an input)")
    p.add_argument("--per-item", action="store_true",
                   help="with --json: add each item's id, prediction, probabilities, PE, MI and metadata "
                        "(the JSONL file's other fields)")
    p.add_argument("--plot", default=None, help="write reliability diagrams and MI histograms (PNG) here")
    p.add_argument("--limit", type=int, default=None, help="the first N items (and N OOD items)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--generate", action="store_true",
                   help="free-text QA instead of multiple choice: --data is a JSONL file of "
                        "{\"question\", \"answers\": [...]} lines or a built-in set (trivia_qa, nq_open, sciq, "
                        "squad); greedy answers, their accuracy, and how well each sequence-level score "
                        "flags the wrong ones (AUROC, AURC, PRR)")
    p.add_argument("--max-tokens", type=int, default=16, help="--generate: the longest answer in tokens")


def _run_eval(args) -> int:
    from . import benchmarks
    from .artifacts import check_output_file
    from .evaluate import evaluate, format_table, per_item, plot, write_json
    from .models import load_base_model
    from .posterior import load_posterior

    if args.per_item and not args.json:
        raise TFBError("--per-item needs --json FILE")
    if args.generate:
        return _run_eval_generate(args)
    _eval_model(args)
    inputs = [("--model", args.model), ("--adapter", args.adapter), ("--data", args.data), ("--ood", args.ood)]
    outputs = {flag: check_output_file(path, inputs=inputs, flag=flag)
               for flag, path in (("--json", args.json), ("--plot", args.plot)) if path}
    if len(set(outputs.values())) < len(outputs):
        raise TFBError(f"--json and --plot name the same file, {args.json}; name two files")
    items = benchmarks.load(args.data, args.limit)
    ood = benchmarks.load(args.ood, args.limit) if args.ood else None
    base = load_base_model(args.model, device=args.device, dtype=args.dtype)
    post = load_posterior(base, args.adapter)
    cfg = post.config
    calibration = None
    if args.coverage:
        calibration = cfg.conformal
        if calibration is None:
            raise TFBError(f"--coverage: {args.adapter} holds no held-out calibration; make one with "
                           f"tfb bayesianize on labelled calibration items")
        overrides = [f for f, v in (("--sigma", args.sigma), ("--samples", args.samples), ("--seed", args.seed),
                                    ("--temperature", args.temperature), ("--mode", args.mode),
                                    ("--chat", args.chat), ("--length-normalize", args.length_normalize))
                     if v is not None]
        if overrides:
            raise TFBError(f"--coverage uses the calibration recorded with the posterior's own settings; "
                           f"drop {', '.join(overrides)}")
    options = cfg.score_options.resolve(mode=args.mode, chat=args.chat, length_normalize=args.length_normalize,
                                        num_samples=args.samples, seed=args.seed)
    report = evaluate(post, items, mode=options.mode, num_samples=options.num_samples, seed=options.seed,
                      sigma=args.sigma, chat=options.chat, length_normalize=options.length_normalize,
                      temperature=cfg.temperature if args.temperature is None else args.temperature,
                      ood_items=ood, batch_size=args.batch_size, calibration=calibration, max_risk=args.max_risk,
                      confidence=cfg.confidence_model if cfg.confidence is not None else None)
    print(format_table(report))
    if args.per_item:
        report["items"] = per_item(report, items)
    if args.json:
        write_json(report, args.json, inputs=inputs, flag="--json")
    if args.plot:
        plot(report, args.plot, inputs=inputs, flag="--plot")
    return 0


def _eval_model(args) -> None:
    """``tfb eval``'s model and adapter: the demo's when neither is given; the model checked at once."""
    from .demo import DEMO_POSTERIOR
    from .models import check_model

    if args.model is None and args.adapter is None:
        args.model, args.adapter = DEMO_MODEL, str(DEMO_POSTERIOR)
    elif args.adapter is None:
        raise TFBError("--adapter is required with --model")
    args.model = args.model or DEMO_MODEL
    check_model(args.model)


def _run_eval_generate(args) -> int:
    from .artifacts import check_output_file
    from .evaluate import write_json
    from .models import load_base_model
    from .posterior import load_posterior
    from .qa import evaluate_generation, format_generation, load_qa

    unused = [f for f, v in (("--coverage", args.coverage), ("--ood", args.ood), ("--plot", args.plot),
                             ("--mode", args.mode), ("--temperature", args.temperature),
                             ("--length-normalize", args.length_normalize), ("--max-risk", args.max_risk))
              if v not in (None, False)]
    if unused:
        raise TFBError(f"--generate scores free-text answers; {', '.join(unused)} apply to multiple choice only")
    if args.max_tokens < 1:
        raise TFBError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    _eval_model(args)
    inputs = [("--model", args.model), ("--adapter", args.adapter), ("--data", args.data)]
    if args.json:
        check_output_file(args.json, inputs=inputs, flag="--json")
    items = load_qa(args.data, args.limit)
    post = load_posterior(load_base_model(args.model, device=args.device, dtype=args.dtype), args.adapter)
    if args.sigma is not None:
        post.sigma = args.sigma
    report = evaluate_generation(post, items, num_samples=args.samples or post.config.num_samples,
                                 max_tokens=args.max_tokens, batch_size=args.batch_size,
                                 chat=post.config.chat if args.chat is None else args.chat, seed=args.seed,
                                 progress=True)
    print(format_generation(report))
    if not args.per_item:
        report.pop("items")
    if args.json:
        write_json(report, args.json, inputs=inputs, flag="--json")
    return 0


register_command("finetune", "train a LoRA adapter on multiple-choice data (MLE)", _add_finetune, _run_finetune)
register_command("eval", "deterministic adapter vs TFB posterior on a benchmark", _add_eval, _run_eval)


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
