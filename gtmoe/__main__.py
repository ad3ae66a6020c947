"""Command line: `python -m gtmoe {prepare,train,evaluate,baselines,routers} ...` (each with --help).

Exit status: 0 on success; 2 with one `error: ...` line for a problem the user
can fix (configuration, data, run directory or checkpoint; the line names the
key or file and how to recover); 1 with one `error: ...` line when training
stops on a non-finite loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from gtmoe.checks import positive_int
from gtmoe.errors import GtmoeError, NonFiniteLossError, RunError


def _set_up_compute(threads: int | None) -> None:
    """Before a verb that runs the model: torch's CPU threads, and the allocator's page reuse."""
    from gtmoe.device import retain_freed_memory

    retain_freed_memory()
    if threads:
        import torch

        torch.set_num_threads(threads)


def _cmd_train(args: argparse.Namespace) -> None:
    from gtmoe.config import load_run_config
    from gtmoe.study import read_record, run_config_from_record
    from gtmoe.train import train

    if args.config:
        cfg = load_run_config(args.config)
    else:
        if args.variant is None or args.seed is None:
            raise RunError("--study needs --variant and --seed: the run of the study to train")
        cfg = run_config_from_record(read_record(args.study), args.variant, args.seed)
    _set_up_compute(args.threads)
    summary = train(cfg, args.out, stop_after=args.stop_after)
    logging.getLogger("gtmoe").info("train: %s", json.dumps(summary))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from gtmoe.evaluate import evaluate_splits
    from gtmoe.files import remove_stale_temporaries, write_atomic
    from gtmoe.runfiles import unwritable

    _set_up_compute(args.threads)
    if len(args.out) != len(args.split):
        raise RunError(
            f"--split names {len(args.split)} split(s) but --out {len(args.out)} file(s); "
            "give one output JSON per split, in the same order"
        )
    for out in args.out:  # before evaluating: a bad --out should not cost an evaluation
        if out.is_dir():
            raise RunError(f"--out {out} is a directory; pass the JSON file to write, e.g. {out / 'eval.json'}")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise unwritable(out, exc, "the evaluation output") from None
        remove_stale_temporaries(out.parent, out.name)
    study = _study_run(args.study, args.run) if args.study is not None else None
    results = evaluate_splits(args.run, args.split, device=args.device, study_run=study)
    for split, out in zip(args.split, args.out):
        result = results[split]
        text = json.dumps(result, indent=2)
        try:
            write_atomic(out, lambda tmp, text=text: tmp.write_text(text))
        except OSError as exc:
            raise unwritable(out, exc, "the evaluation output") from None
        logging.getLogger("gtmoe").info(
            "evaluate %s %s: ppl %.2f gini %s -> %s", args.run, split, result["ppl"], result["gini"], out
        )


def _study_run(study: Path, run_dir: Path):
    """The run config the study asks for in `run_dir` (its last two components name the variant and seed)."""
    import re

    from gtmoe.study import read_record, run_config_from_record

    match = re.fullmatch(r"seed(\d+)", run_dir.name)
    if match is None:
        raise RunError(f"--run {run_dir} does not end in <variant>/seed<N>, so --study cannot name its run")
    return run_config_from_record(read_record(study), run_dir.parent.name, int(match.group(1)))


def _cmd_baselines(args: argparse.Namespace) -> None:
    from gtmoe.baselines import write_ngram_baselines

    write_ngram_baselines(args.shards, args.out)


def _cmd_routers(args: argparse.Namespace) -> None:
    import dataclasses

    from gtmoe import routers

    for name in routers.known():
        options = routers.get(name).Config()
        print(name, json.dumps(dataclasses.asdict(options)))


def build_parser() -> argparse.ArgumentParser:
    from gtmoe.data.cli import add_prepare_parser

    parser = argparse.ArgumentParser(
        prog="python -m gtmoe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    add_prepare_parser(commands)

    train = commands.add_parser(
        "train",
        help="train one run (resumes from OUT/checkpoint_last.pt if present)",
        description="Train one (variant, seed) run described by a run config YAML.",
    )
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="run config YAML (as `config.yaml` of a run directory)")
    source.add_argument(
        "--study", type=Path, help="study record results/<name>/study.json (how the workflow passes it)"
    )
    train.add_argument("--variant", help="with --study: the variant to train")
    train.add_argument("--seed", type=int, help="with --study: the seed to train")
    train.add_argument("--out", type=Path, required=True, help="run directory: checkpoints, logs, summary")
    train.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    train.add_argument(
        "--stop-after",
        type=positive_int,
        default=None,
        help="checkpoint and exit after this many optimizer steps (for resumption tests)",
    )
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a trained run on one or more splits",
        description="Perplexity and load metrics of a finished run, one JSON per split, "
        "from a single load of the model.",
    )
    evaluate.add_argument("--run", type=Path, required=True, help="run directory written by `train`")
    evaluate.add_argument(
        "--split", choices=("train", "validation", "test"), nargs="+", required=True, help="split(s) to evaluate"
    )
    evaluate.add_argument(
        "--out", type=Path, nargs="+", required=True, help="output JSON file(s), one per --split, in the same order"
    )
    evaluate.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="device (default: the run's train.device; auto = CUDA when available)",
    )
    evaluate.add_argument(
        "--study",
        type=Path,
        default=None,
        help="study record results/<name>/study.json: evaluate with its `eval` settings, and only if the run "
        "is the one the study asks for (how the workflow calls it; default: the run's config.yaml)",
    )
    evaluate.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    evaluate.set_defaults(func=_cmd_evaluate)

    baselines = commands.add_parser(
        "baselines",
        help="unigram and interpolated bigram reference models on the token shards",
        description="Count an add-k unigram and an interpolated bigram model on SHARDS/train, tune k and the "
        "interpolation weight on SHARDS/validation, and write their validation and test token and "
        "word perplexity as JSON (see gtmoe/baselines.py).",
    )
    baselines.add_argument(
        "--shards",
        type=Path,
        required=True,
        help="shard root holding train/, validation/ and test/ (e.g. results/data/shards)",
    )
    baselines.add_argument(
        "--out", type=Path, required=True, help="output JSON file (e.g. results/baselines/ngram.json)"
    )
    baselines.set_defaults(func=_cmd_baselines)

    listing = commands.add_parser("routers", help="list the registered routers and their default options")
    listing.set_defaults(func=_cmd_routers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        args.func(args)
    except GtmoeError as exc:
        if args.verbose:  # the one-line error stays last; the traceback is for debugging gtmoe itself
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, NonFiniteLossError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
