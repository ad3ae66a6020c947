"""Command line: `python -m gtmoe {prepare,train,evaluate,baselines,routers} ...` (each with --help).

Exit status: 0 on success; 2 with one `error: ...` line for a problem the user
can fix (configuration, data, run directory or checkpoint; the line names the
key or file and how to recover); 1 with one `error: ...` line when training
stops on a non-finite loss.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import stat
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path

from gtmoe.checks import positive_int
from gtmoe.errors import GtmoeError, NonFiniteLossError, OutputError, RunError

MAX_THREADS = 1024  # torch takes an int32 and starts that many threads: a typo (--threads 1000000) is refused


def threads(text: str) -> int:
    """argparse type of --threads: an integer in [1, MAX_THREADS]."""
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS}, not {value}")
    return value


# ------------------------------------------------------------------ no command writes over what it reads


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _same_file(a: Path, b: Path) -> bool:
    """The same file: one path resolved (symbolic links, '..'), or one file under two names (a hard link)."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _inside(path: Path, directory: Path) -> bool:
    """`path` is `directory` or lies below it (after resolving both)."""
    real, root = _real(path), _real(directory)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _clobbers(source: Path, directory: Path, names: Iterable[str]) -> str | None:
    """The name, among the `names` (glob patterns) a command writes in `directory`, that is `source` (as given or
    resolved), if any."""
    for path in (source, Path(_real(source))):
        if _real(path.parent) == _real(directory):
            for pattern in names:
                if fnmatch.fnmatchcase(path.name, pattern):
                    return path.name
    return None


def refuse_overwrite(
    flag: str,
    outputs: Iterable[Path],
    reads: Iterable[Path] = (),
    read_dirs: Iterable[Path] = (),
    writes: Iterable[str] | None = None,
) -> None:
    """Before any work, refuse (one OutputError) an output given with `flag` that is one of the files the command
    reads (`reads`), lies in a directory it reads (`read_dirs`: shards), is another output of the same command,
    or is a device, FIFO or socket (an atomic write would replace it). With `writes` (the glob patterns of the
    names it writes there) the outputs are directories: none of the files written there may be a read one."""
    reads, read_dirs, seen = list(reads), list(read_dirs), []
    for out in outputs:
        if writes is not None:
            for source in reads:
                if name := _clobbers(source, out, writes):
                    raise OutputError(
                        f"{flag} {out}: this command writes {name} there, which is {source}, an input it reads; "
                        "write the output to another directory"
                    )
        else:
            try:
                mode = os.stat(out).st_mode
            except OSError:  # does not exist yet (or cannot be read: the write reports that)
                mode = None
            if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise OutputError(
                    f"{flag} {out} is not a regular file (a device, FIFO or socket), and writing the output would "
                    "replace it; pass a file path"
                )
        for earlier in seen:
            if _same_file(out, earlier):
                raise OutputError(f"{flag} {out} is given twice (also as {earlier}); give each output its own file")
        for source in reads:
            if _same_file(out, source):
                raise OutputError(
                    f"{flag} {out} is {source}, which this command reads; write the output to another file"
                )
        for directory in read_dirs:
            if _inside(out, directory):
                raise OutputError(
                    f"{flag} {out} lies in {directory}, which this command reads; write the output outside it"
                )
        seen.append(out)


def _run_files(run_dir: Path) -> list[Path]:
    """The files of a run directory that `train` writes and `evaluate` reads: its config, checkpoints and their
    manifests, logs and summary."""
    from gtmoe.contract import RESUME_CHECKPOINT, SATURATION_CHECKPOINT, TRAIN_OUTPUTS
    from gtmoe.runfiles import manifest_path

    files = [run_dir / name for name in (*TRAIN_OUTPUTS, RESUME_CHECKPOINT, SATURATION_CHECKPOINT)]
    return files + [manifest_path(path) for path in files if path.suffix == ".pt"]


def _check_train_paths(args: argparse.Namespace) -> None:
    """train writes its run files into --out: --config must not be one of them."""
    if args.config is not None:
        written = [path.name for path in _run_files(args.out)]
        refuse_overwrite("--out", [args.out], reads=[args.config], writes=written)


def _check_evaluate_paths(args: argparse.Namespace) -> None:
    """evaluate reads the run's files, the study record and the shards of its splits; its --out files are none of
    them."""
    from gtmoe.config import load_run_config
    from gtmoe.contract import RUN_CONFIG

    reads = _run_files(args.run) + ([args.study] if args.study is not None else [])
    config = args.run / RUN_CONFIG
    shards = Path(load_run_config(config).data.shards) if config.is_file() else None  # else evaluate names it
    refuse_overwrite("--out", args.out, reads, [shards / split for split in args.split] if shards else [])


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

    _check_train_paths(args)
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

    if len(args.out) != len(args.split):
        raise RunError(
            f"--split names {len(args.split)} split(s) but --out {len(args.out)} file(s); "
            "give one output JSON per split, in the same order"
        )
    for split in args.split:
        if args.split.count(split) > 1:
            raise RunError(f"--split names {split} {args.split.count(split)} times; name each split once")
    _check_evaluate_paths(args)
    _set_up_compute(args.threads)
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
    from gtmoe.contract import SPLITS

    refuse_overwrite("--out", [args.out], read_dirs=[args.shards / split for split in SPLITS])
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
    train.add_argument(
        "--threads", type=threads, default=None, help=f"torch CPU threads, 1-{MAX_THREADS} (default: torch's choice)"
    )
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
        "--threads", type=threads, default=None, help=f"torch CPU threads, 1-{MAX_THREADS} (default: torch's choice)"
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
        if paths := getattr(args, "paths", None):  # a verb's declared outputs and inputs (gtmoe.data.cli)
            refuse_overwrite(**paths(args))
        args.func(args)
    except GtmoeError as exc:
        if args.verbose:  # the one-line error stays last; the traceback is for debugging gtmoe itself
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, NonFiniteLossError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
