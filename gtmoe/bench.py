"""Throughput benchmark: the MoE layer against a dense FFN, every router's train step, and evaluation.

    python -m gtmoe.bench [--device cpu] [--compile] [--json bench.json]
    python -m gtmoe.bench --config config.yaml [workflow/presets/smoke.yaml] [--json bench.json]

Everything runs in one process, and every number is a median over `--repeats`
timed calls after `--warmup` untimed ones. Candidates that are compared are
timed interleaved (one call of each per round), so a slow drift in machine load
(the other jobs of a laptop, clock boosting) hits all of them alike and their
ratios stay fair. Sustained contention is another matter: multi-threaded CPU
kernels stall at their barriers when other processes hold the cores, the more
kernels the worse, so the report prints the load average to judge a run by.

(a) MoE layer (top-k router) forward + backward against a dense SwiGLU of
    hidden k * d_expert on the same tokens: equal active FLOPs, since each
    token runs through k experts of hidden d_expert. The layer's cost is then
    split: its experts alone on rows already sorted by expert, and the layer
    replaying a routing computed beforehand (everything but the router).
(b) train step of a MoETransformer per variant, relative to the reference
    (`topk`, or the study config's `reference`);
(c) the same steps as tokens/s, and evaluation tokens/s: a no-grad forward of
    one routing group (train.batch_size blocks) in eval mode, with the
    per-layer routing statistics of gtmoe.evaluate;
(d) model FLOP/s as a fraction of the fp32 GEMM peak the benchmark measures on
    this device at this thread count (an n x n @ n x n matmul, 2 n^3 FLOPs);
    on CUDA also model FLOP utilisation against the device's dense bf16 peak.
    On CPU, the share of the step spent in matmul kernels (torch.profiler,
    a few profiled steps) splits the gap to the peak in two: the fraction the
    step would reach if it were its matmuls alone (small matrices run below
    the n x n peak), and the time outside them (elementwise ops, routing,
    dispatch, the optimizer).

With `--config`, the sizes come from a study config, resolved as the workflow
resolves it (gtmoe.study.Study.from_config, then Study.run_config per variant;
several files are merged like Snakemake's --configfile: mappings key by key,
anything else replaced): model, batch_size x seq_len tokens, optimizer, lr
schedule and every variant's router options (horizon-dependent ones resolved).
Variants default to all of the config's, threads to 1, as the study's jobs run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gtmoe import routers
from gtmoe.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RouterConfig,
    RunConfig,
    TrainConfig,
    load_yaml,
)
from gtmoe.device import autocast_context, resolve_device, retain_freed_memory
from gtmoe.evaluate import LayerStats
from gtmoe.ffn import SwiGLU
from gtmoe.model import IGNORE_INDEX, MoETransformer, build_model
from gtmoe.moe import MoELayer
from gtmoe.routers.base import Routing, expert_counts
from gtmoe.step import build_optimizer, lr_lambda, train_step

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
SHARDS_DIR = "results/data/shards"  # as workflow/rules/common.smk; the benchmark reads no shards

# Dense (not 2:4-sparse) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, matched as
# substrings of torch.cuda.get_device_name(); the first match wins, so specific names come first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM, reported as "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),  # also matches GH200
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gtmoe.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    except (RuntimeError, ConfigError) as exc:
        parser.error(str(exc))
    if args.config is not None:
        given = sorted({flag for flag in SIZE_FLAGS for arg in argv if arg == flag or arg.startswith(flag + "=")})
        if given:
            parser.error(f"{', '.join(given)}: the sizes come from --config; leave these flags out")
        if args.threads is None:
            args.threads = 1
        try:
            study_runs(args)
        except ConfigError as exc:
            parser.error(f"invalid configuration: {exc}")
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


def merge_configs(base: dict, overlay: dict) -> dict:
    """`overlay` over `base` as Snakemake merges --configfile files: mappings key by key, anything else replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def study_runs(args: argparse.Namespace) -> None:
    """Resolve --config as the workflow does; set args.runs (variant -> RunConfig), args.reference, the sizes."""
    from gtmoe.study import Study  # only --config needs it

    config: dict = {}
    for path in args.config:
        loaded = load_yaml(path)  # strict: duplicate keys, anchors and aliases are errors, as in the workflow
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must be a mapping of config sections")
        config = merge_configs(config, loaded)
    study = Study.from_config(config, shards_dir=SHARDS_DIR)
    seq_len = (config.get("data") or {}).get("seq_len")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ConfigError(f"config key 'data.seq_len' = {seq_len!r}: must be an integer >= 1")
    args.runs = {name: study.run_config(name, args.seed, SHARDS_DIR) for name in study.variant_names}
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
    """The run config of the size flags: one micro-batch of --tokens, TrainConfig's defaults otherwise."""
    return RunConfig(
        variant=name,
        model=model_config(args),
        router=RouterConfig.from_mapping({"name": name}),
        train=TrainConfig(seed=args.seed, batch_size=args.tokens // args.seq_len),
        data=DataConfig(shards=SHARDS_DIR),
        eval=EvalConfig(),
    ).validate()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    candidates: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed one call of each per round.

    The order rotates from round to round, so no candidate always runs first
    (after the pause of the previous round) or always after the same neighbour.
    """
    names = list(candidates)
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            candidates[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class _ReplayRouter(torch.nn.Module):
    """Returns one routing, computed once, on every call: the MoE layer's work without the router's."""

    def __init__(self, routing: Routing, n_experts: int):
        super().__init__()
        self.routing, self.n_experts = routing, n_experts

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> Routing:
        return self.routing


def bench_layer(args: argparse.Namespace, device: torch.device) -> dict:
    """(a) MoE layer with the top-k router against the dense SwiGLU of equal active FLOPs, and where its time goes.

    Two more candidates split the MoE layer's cost: `experts`, its grouped SwiGLU experts alone on rows
    already sorted by expert (the arithmetic, as the dense FFN is), and `fixed_routing`, the whole layer
    replaying one routing computed beforehand (the experts plus sorting, the row permutations and the
    weighted combination, without the router's own gate, top-k and losses).
    """
    torch.manual_seed(args.seed)
    router_cls = routers.get("topk")
    router = router_cls(RouterConfig.from_mapping({"name": "topk"}).resolve(), args.d_model, args.experts, args.top_k)
    moe = MoELayer(router, args.d_model, args.d_expert, args.experts).to(device).train()
    dense = SwiGLU(args.d_model, args.top_k * args.d_expert).to(device).train()
    x = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)
    grad_out = torch.randn(args.tokens, args.d_model, device=device)

    with torch.no_grad():
        routing = router(x)
    # The combine weights stay differentiable, as the gate's are: their gradient is part of the layer's work.
    routing.weight = routing.weight.detach().clone().requires_grad_()
    replay = MoELayer(_ReplayRouter(routing, args.experts), args.d_model, args.d_expert, args.experts)
    replay.experts = moe.experts
    order = torch.argsort(routing.expert, stable=True)
    offsets = expert_counts(routing.expert[order], args.experts).cumsum(0)
    sorted_rows = x.detach().index_select(0, routing.token[order]).requires_grad_()
    grad_sorted = torch.randn_like(sorted_rows)

    def layer_pass(layer: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            with autocast_context(device):
                y = layer(x)
            outputs, grads = [y], [grad_out.to(y.dtype)]
            if isinstance(layer, MoELayer) and layer.last_routing.loss.requires_grad:
                outputs.append(layer.last_routing.loss)  # the router's auxiliary losses are part of its cost
                grads.append(torch.ones_like(outputs[-1]))
            torch.autograd.backward(outputs, grads)

        return run

    def experts_pass() -> None:
        moe.experts.zero_grad(set_to_none=True)
        sorted_rows.grad = None
        with autocast_context(device):
            y = moe.experts(sorted_rows, offsets)
        y.backward(grad_sorted.to(y.dtype))

    candidates = {
        "moe": layer_pass(moe),
        "dense": layer_pass(dense),
        "fixed_routing": layer_pass(replay),
        "experts": experts_pass,
    }
    seconds = interleaved_medians(candidates, device, args.warmup, args.repeats)
    return {
        "moe_s": seconds["moe"],
        "dense_s": seconds["dense"],
        "ratio": seconds["moe"] / seconds["dense"],
        "experts_s": seconds["experts"],
        "experts_ratio": seconds["experts"] / seconds["dense"],
        "fixed_routing_s": seconds["fixed_routing"],
        "fixed_routing_ratio": seconds["fixed_routing"] / seconds["dense"],
        "d_expert": args.d_expert,
        "dense_hidden": args.top_k * args.d_expert,
    }


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


class TrainStep:
    """One optimizer step of gtmoe/train.py's loop, on fixed micro-batches of random tokens.

    The model, optimizer and lr schedule are built by train.py's own functions from the run config;
    the step is the trainer's own (`gtmoe.step.train_step`; no logging or checkpoint boundaries).
    """

    def __init__(
        self,
        cfg: RunConfig,
        seq_len: int,
        device: torch.device,
        compiled: bool = False,
        model: MoETransformer | None = None,
    ):
        self.device = device
        self.tcfg = tcfg = cfg.train
        if model is None:
            # As train(): every variant starts from the same initialisation where shapes agree.
            torch.manual_seed(tcfg.seed)
            model = build_model(cfg).to(device)
        self.model = model.train()
        # dynamic=False: compiled like the one model of a training process. Variants share the forward's code
        # object, and automatic dynamic would otherwise turn their differing router options into graph inputs.
        self.forward = torch.compile(model, dynamic=False) if compiled else model
        self.optimizer = build_optimizer(model, tcfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tcfg))
        tokens = torch.randint(
            0,
            cfg.model.vocab_size,
            (tcfg.grad_accum, tcfg.batch_size, seq_len + 1),
            generator=torch.Generator().manual_seed(tcfg.seed),
        )
        self.batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]  # on the host, as TokenBlocks
        self.tokens_per_step = tcfg.grad_accum * tcfg.batch_size * seq_len
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.step = 0

    def __call__(self) -> None:
        result = train_step(self.model, self.forward, self.optimizer, self.batches, self.tcfg, self.device)
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~result.finite, self.step, self.first_bad_step)
        self.scheduler.step()
        self.step += 1


class EvalStep:
    """One routing group of gtmoe/evaluate.py's loop: a no-grad forward of train.batch_size blocks in eval mode,
    the loss sums and LayerStats.add per MoE layer (router saturation's second model is not included)."""

    def __init__(self, cfg: RunConfig, seq_len: int, device: torch.device):
        self.device = device
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg).to(device).eval()
        tokens = torch.randint(
            0,
            cfg.model.vocab_size,
            (cfg.train.batch_size, seq_len + 1),
            generator=torch.Generator().manual_seed(cfg.train.seed + 1),
        )
        self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        self.tokens = cfg.train.batch_size * seq_len
        self.stats = [LayerStats(cfg.model.n_experts, cfg.model.vocab_size, device) for _ in self.model.moe_layers]
        self.nll_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.n_tokens = torch.zeros((), dtype=torch.long, device=device)

    @torch.no_grad()
    def __call__(self) -> None:
        x, y = self.x.to(self.device), self.y.to(self.device)
        valid = (y != IGNORE_INDEX).reshape(-1)
        with autocast_context(self.device):
            out = self.model(x, y)
        self.nll_sum += out.token_loss.double().sum()
        self.n_tokens += valid.sum()
        flat_ids = x.reshape(-1)
        for layer_stats, layer in zip(self.stats, self.model.moe_layers):
            layer_stats.add(layer.last_routing, flat_ids, valid)


def bench_gemm(args: argparse.Namespace, device: torch.device) -> dict:
    """This device's fp32 GEMM rate at the benchmark's thread count: the peak model FLOP/s are measured against."""
    n = args.gemm_size
    generator = torch.Generator().manual_seed(args.seed)
    a, b = (torch.randn(n, n, generator=generator).to(device) for _ in range(2))
    out = torch.empty(n, n, device=device)
    seconds = interleaved_medians({"gemm": lambda: torch.mm(a, b, out=out)}, device, args.warmup, args.repeats)["gemm"]
    return {"size": n, "dtype": "float32", "seconds": seconds, "flops_per_s": 2 * n**3 / seconds}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if device.type != "cuda":
        return None
    if override_tflops is not None:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


def flops_per_token(model: MoETransformer, seq_len: int) -> int:
    """Model FLOPs of a train step per token (PaLM appendix B): 6 per active weight, plus attention.

    Active weights count a token's routed experts only, and the tied embedding
    once (it is the LM head's matmul; the lookup is free). Attention scores and
    values add 12 * layers * d_model * seq_len (causal masking not discounted,
    the usual convention).
    """
    cfg = model.cfg
    return 6 * model.parameter_counts()[1] + 12 * cfg.n_layers * cfg.d_model * seq_len


# Matmul kernels in torch.profiler's CPU trace (F.grouped_mm runs an aten::mm per expert on CPU).
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def matmul_share(step: Callable[[], None], n_steps: int = 5) -> float:
    """Fraction of a CPU step's operator self time spent in matmul kernels, over `n_steps` profiled steps."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n_steps):
            step()
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    return sum(event.self_cpu_time_total for event in events if event.key in MATMUL_OPS) / total


def bench_train_steps(args: argparse.Namespace, device: torch.device, gemm_peak: float) -> dict:
    """(b), (c), (d): step time, tokens/s and FLOP rates of every variant, eager and optionally compiled,
    and its evaluation tokens/s."""
    steps = {name: TrainStep(cfg, args.seq_len, device) for name, cfg in args.runs.items()}
    if args.sync_debug:
        check_no_host_sync(steps, device)
    candidates: dict[str, Callable[[], None]] = dict(steps)
    evals = {name: EvalStep(cfg, args.seq_len, device) for name, cfg in args.runs.items()}
    candidates.update({f"{name}+eval": step for name, step in evals.items()})
    if args.compile:
        for name, step in steps.items():
            candidates[f"{name}+compile"] = TrainStep(
                args.runs[name], args.seq_len, device, compiled=True, model=step.model
            )
    seconds = interleaved_medians(candidates, device, args.warmup, args.repeats)

    peak = peak_flops(device, args.peak_tflops)
    reference = seconds[args.reference]
    results = {}
    for name, step in steps.items():
        tokens = step.tokens_per_step
        flops = flops_per_token(step.model, args.seq_len) * tokens
        eval_s = seconds[f"{name}+eval"]
        row = {
            "step_s": seconds[name],
            "ratio_to_reference": seconds[name] / reference,
            "tokens_per_s": tokens / seconds[name],
            "flops_per_step": flops,
            "flops_per_s": flops / seconds[name],
            "gemm_fraction": flops / seconds[name] / gemm_peak,
            "mfu": flops / seconds[name] / peak if peak else None,
            "eval_s": eval_s,
            "eval_tokens_per_s": evals[name].tokens / eval_s,
            "eval_to_train": (evals[name].tokens / eval_s) / (tokens / seconds[name]),
        }
        if device.type == "cpu":
            row["matmul_share"] = share = matmul_share(step)
            row["matmul_only_gemm_fraction"] = row["gemm_fraction"] / share
        if args.reference == "topk":
            row["ratio_to_topk"] = row["ratio_to_reference"]
        if args.compile:
            compiled = seconds[f"{name}+compile"]
            row.update(
                {
                    "compiled_step_s": compiled,
                    "compiled_tokens_per_s": tokens / compiled,
                    "compile_speedup": seconds[name] / compiled,
                    "compiled_gemm_fraction": flops / compiled / gemm_peak,
                    "compiled_mfu": flops / compiled / peak if peak else None,
                }
            )
        results[name] = row
    return {
        "reference": args.reference,
        "tokens_per_step": next(iter(steps.values())).tokens_per_step,
        "variants": results,
        "peak_flops": peak,
    }


def check_no_host_sync(steps: dict[str, TrainStep], device: torch.device, n_steps: int = 3) -> None:
    """Run eager steps with every host-device sync an error (the first step's optimizer state init included)."""
    for step in steps.values():
        synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(n_steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    print(f"sync-debug: {n_steps} train steps of each variant ran without a host-device sync")


def format_report(result: dict) -> str:
    cfg, layer, train, gemm = result["config"], result["moe_layer"], result["train_step"], result["gemm"]
    source = f"config {' + '.join(cfg['config'])}" if cfg.get("config") else "size flags"
    lines = [
        (
            f"device {result['device_name']}, torch {result['torch']}, {result['threads']} threads, "
            f"load average {result['load_average'][0]:.2f} -> {result['load_average'][1]:.2f} "
            f"on {os.cpu_count()} CPUs"
        ),
        (
            f"(a) MoE layer forward+backward, {cfg['tokens']} tokens, d_model {cfg['d_model']}: "
            f"topk E={cfg['experts']} k={cfg['top_k']} d_expert={layer['d_expert']} {layer['moe_s'] * 1e3:.2f} ms, "
            f"dense SwiGLU hidden {layer['dense_hidden']} {layer['dense_s'] * 1e3:.2f} ms, "
            f"ratio {layer['ratio']:.3f}; its experts alone (rows sorted by expert) {layer['experts_ratio']:.3f}, "
            f"with a routing replayed (sorting, permutations, combine; no router) {layer['fixed_routing_ratio']:.3f}"
        ),
        (
            f"(b-d) train step ({source}), {cfg['layers']} layers, {train['tokens_per_step']} tokens per step "
            f"(batch {cfg['tokens'] // cfg['seq_len']} x {cfg['seq_len']}), vocab {cfg['vocab']}; "
            f"eval: one group of {cfg['tokens']} tokens; fp32 GEMM peak {gemm['flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"({gemm['size']}^3 matmul)"
        ),
    ]
    compiled = cfg["compile"]
    ref = f"/ {train['reference']}"
    header = (
        f"{'variant':<20}{'step ms':>10}{ref:>{max(9, len(ref) + 2)}}{'tokens/s':>11}{'GFLOP/s':>9}"
        f"{'/ GEMM':>8}{'MFU':>8}{'eval tok/s':>12}{'eval/train':>12}{'in matmul':>11}{'matmuls / GEMM':>16}"
    )
    if compiled:
        header += f"{'compiled ms':>13}{'tokens/s':>11}{'speedup':>9}{'/ GEMM':>8}"
    lines.append(header)

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    for name, row in train["variants"].items():
        line = (
            f"{name:<20}{row['step_s'] * 1e3:>10.1f}{row['ratio_to_reference']:>{max(9, len(ref) + 2)}.3f}"
            f"{row['tokens_per_s']:>11.0f}{row['flops_per_s'] / 1e9:>9.2f}{percent(row['gemm_fraction']):>8}"
            f"{percent(row['mfu']):>8}{row['eval_tokens_per_s']:>12.0f}{row['eval_to_train']:>12.2f}"
            f"{percent(row.get('matmul_share')):>11}{percent(row.get('matmul_only_gemm_fraction')):>16}"
        )
        if compiled:
            line += (
                f"{row['compiled_step_s'] * 1e3:>13.1f}{row['compiled_tokens_per_s']:>11.0f}"
                f"{row['compile_speedup']:>9.3f}{percent(row['compiled_gemm_fraction']):>8}"
            )
        lines.append(line)
    return "\n".join(lines)


def json_value(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [json_value(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
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
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
