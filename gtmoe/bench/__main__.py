"""The benchmark's command line, `python -m gtmoe.bench` (its --help: the package docstring).

A problem the user can fix (a gtmoe.errors.GtmoeError: an unreadable or invalid config) is one `error:`
line and exit status 2; a bad flag is argparse's usage error (also 2); anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from gtmoe import bench, routers
from gtmoe.bench.harness import bench_gemm, bench_layer, bench_train_steps
from gtmoe.bench.report import format_report, json_value, write_json
from gtmoe.config import DataConfig, EvalConfig, ModelConfig, RouterConfig, RunConfig, TrainConfig, load_yaml
from gtmoe.device import resolve_device, retain_freed_memory
from gtmoe.errors import ConfigError, GtmoeError

# Flags that set sizes by hand; with --config the config sets them, so giving them too is an error.
SIZE_FLAGS = (
    "--d-model",
    "--experts",
    "--top-k",
    "--d-expert",
    "--tokens",
    "--seq-len",
    "--layers",
    "--heads",
    "--vocab",
)
# torch.compile backends --compile can time: train.compile's own, and its graph without code generation.
COMPILE_BACKENDS = ("inductor", "aot_eager")
SHARDS_DIR = "results/data/shards"  # as workflow/rules/common.smk; the benchmark reads no shards


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gtmoe.bench", description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where to run; auto = CUDA when available (default: %(default)s)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        nargs="+",
        default=None,
        metavar="FILE",
        help="measure at a study config's sizes: config.yaml, optionally followed by presets "
        "merged over it (as snakemake --configfile); replaces the size flags below",
    )
    parser.add_argument("--d-model", type=int, default=256, help="model width (default: %(default)s)")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer, E (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token, k (default: %(default)s)")
    parser.add_argument(
        "--d-expert",
        type=int,
        default=None,
        help="hidden size of one expert (default: 4 * d_model / k, so the dense FFN of equal "
        "active FLOPs has the usual hidden size 4 * d_model)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=4096,
        help="tokens per forward pass: the MoE layer's routing group, and a train step's "
        "batch_size * seq_len (default: %(default)s)",
    )
    parser.add_argument("--seq-len", type=int, default=128, help="train-step sequence length (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=2, help="train-step model depth (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="train-step attention heads (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=4096, help="train-step vocabulary size (default: %(default)s)")
    parser.add_argument(
        "--routers",
        nargs="+",
        default=None,
        metavar="NAME",
        help="variants whose train step is timed (default: every registered router, dense "
        "included; with --config, every variant of the config); the reference (topk, or "
        "the config's `reference`) is always added",
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per measurement (default: %(default)s)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed calls first (allocator, caches, torch.compile) (default: %(default)s)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time each train step with the model under torch.compile (as train.compile)",
    )
    parser.add_argument(
        "--compile-backend",
        choices=COMPILE_BACKENDS,
        default="inductor",
        help="torch.compile's backend for --compile: inductor (as train.compile), or aot_eager, the same traced "
        "graph run by eager kernels: tracing's part of the compiled step, without code generation "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--sync-debug",
        action="store_true",
        help="CUDA only: first run a few eager train steps of each variant under "
        "torch.cuda.set_sync_debug_mode('error'), failing on any host-device sync",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak of the GPU for MFU, when its name is not in the built-in table",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice, or 1 with --config, as the study's CPU jobs use)",
    )
    parser.add_argument(
        "--gemm-size",
        type=int,
        default=2048,
        metavar="N",
        help="the fp32 GEMM peak is timed on an N x N @ N x N matmul (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="initialisation and token seed; with --config, the runs' train.seed (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the results as JSON to OUT")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    for name in (
        "d_model",
        "experts",
        "top_k",
        "tokens",
        "seq_len",
        "layers",
        "heads",
        "vocab",
        "repeats",
        "gemm_size",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first call pays for allocation and compilation)")
    try:
        device = resolve_device(args.device, "--device")
    except ConfigError as exc:
        parser.error(str(exc))
    if args.config is not None:
        given = sorted({flag for flag in SIZE_FLAGS for arg in argv if arg == flag or arg.startswith(flag + "=")})
        if given:
            parser.error(f"{', '.join(given)}: the sizes come from --config; leave these flags out")
        if args.threads is None:
            args.threads = 1
        study_runs(args)  # a GtmoeError: main's one `error:` line
        unknown = sorted(set(args.routers) - set(args.runs))
        if unknown:
            parser.error(f"unknown variant(s) {', '.join(unknown)}; the config has: {', '.join(args.runs)}")
        args.runs = {name: args.runs[name] for name in args.routers}
    else:
        if args.top_k > args.experts:
            parser.error("--top-k must be <= --experts")
        if args.d_expert is None:
            args.d_expert = 4 * args.d_model // args.top_k
        if args.tokens % args.seq_len:
            parser.error(f"--tokens {args.tokens} must be a multiple of --seq-len {args.seq_len}")
        known = routers.known()
        args.reference = "topk"
        args.routers = known if args.routers is None else ["topk"] + [r for r in args.routers if r != "topk"]
        unknown = sorted(set(args.routers) - set(known))
        if unknown:
            parser.error(f"unknown router(s) {', '.join(unknown)}; known: {', '.join(known)}")
        try:
            model_config(args)
            args.runs = {name: legacy_run_config(args, name) for name in args.routers}
        except ConfigError as exc:
            parser.error(str(exc))
    if args.sync_debug and device.type != "cuda":
        parser.error("--sync-debug needs a CUDA device (it checks CUDA host-device syncs)")
    return args


def read_config(paths: Sequence[Path]) -> dict:
    """The config the workflow gets from `snakemake --configfile paths...`: each file read strictly
    (duplicate keys, anchors and aliases are errors, as the workflow re-reads them), then merged in order
    by Snakemake's own merge (mappings key by key, anything else replaced)."""
    from snakemake.utils import update_config  # only --config needs Snakemake

    config: dict = {}
    for path in paths:
        loaded = load_yaml(path)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must be a mapping of config sections")
        update_config(config, loaded)
    return config


def study_runs(args: argparse.Namespace) -> None:
    """Resolve --config as the workflow does; set args.runs (variant -> RunConfig), args.reference, the sizes."""
    from gtmoe.study import Study  # only --config needs it

    config = read_config(args.config)
    seq_len = (config.get("data") or {}).get("seq_len")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ConfigError(f"config key 'data.seq_len' = {seq_len!r}: must be an integer >= 1")
    study = Study.from_config(config)
    args.runs = {name: study.run_config(name, args.seed) for name in study.variant_names}
    args.reference = study.reference
    names = study.variant_names if args.routers is None else args.routers
    args.routers = [study.reference] + [name for name in names if name != study.reference]
    # The model and train sections are shared by every variant: the reference's sizes are everyone's.
    cfg = args.runs[study.reference]
    model, train = cfg.model, cfg.train
    args.d_model, args.experts, args.top_k, args.d_expert = model.d_model, model.n_experts, model.top_k, model.d_expert
    args.layers, args.heads, args.vocab, args.seq_len = model.n_layers, model.n_heads, model.vocab_size, seq_len
    args.tokens = train.batch_size * seq_len  # one micro-batch: the routing group of training and evaluation


def legacy_run_config(args: argparse.Namespace, name: str) -> RunConfig:
    """The run config of the size flags: one micro-batch of --tokens, TrainConfig's defaults otherwise;
    horizon-dependent router options resolved, as a run's are."""
    cfg = RunConfig(
        variant=name,
        model=model_config(args),
        router=RouterConfig.from_mapping({"name": name}),
        train=TrainConfig(seed=args.seed, batch_size=args.tokens // args.seq_len),
        data=DataConfig(shards=SHARDS_DIR),
        eval=EvalConfig(),
    )
    return cfg.at_horizon().validate()


def model_config(args: argparse.Namespace) -> ModelConfig:
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        max_seq_len=args.seq_len,
        n_experts=args.experts,
        top_k=args.top_k,
        d_expert=args.d_expert,
    )
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv`, measure, print the report (and write the JSON); a GtmoeError exits 2 with one `error:` line."""
    try:
        return run(parse_args(argv))
    except GtmoeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def run(args: argparse.Namespace) -> dict:
    """Measure what `args` (from parse_args) asks for; print the report, write the JSON, return the results."""
    device = resolve_device(args.device, "--device")
    retain_freed_memory()  # as `python -m gtmoe train|evaluate` run
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    result = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {key: json_value(value) for key, value in vars(args).items() if key != "runs"},
        # Every variant's resolved run config (router options at the run's horizon included).
        "run_configs": {name: cfg.to_dict() for name, cfg in args.runs.items()},
        "gemm": bench_gemm(args, device),
        "moe_layer": bench_layer(args, device),
    }
    result["train_step"] = bench_train_steps(args, device, result["gemm"]["flops_per_s"])
    result["load_average"] = [load_before, os.getloadavg()[0]]  # 1-minute, before and after
    print(format_report(result))
    if args.json is not None:
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
