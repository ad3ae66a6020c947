"""Throughput benchmark: the MoE layer against a dense FFN, and every router's train step.

    python -m gtmoe.bench [--device cpu] [--compile] [--json bench.json]

Everything runs in one process, and every number is a median over `--repeats`
timed calls after `--warmup` untimed ones. Candidates that are compared are
timed interleaved (one call of each per round), so a slow drift in machine load
(the other jobs of a laptop, clock boosting) hits all of them alike and their
ratios stay fair. Sustained contention is another matter: multi-threaded CPU
kernels stall at their barriers when other processes hold the cores, the more
kernels the worse, so the report prints the load average to judge a run by.

(a) MoE layer (top-k router) forward + backward against a dense SwiGLU of
    hidden k * d_expert on the same tokens: equal active FLOPs, since each
    token runs through k experts of hidden d_expert.
(b) train step of a small MoETransformer per router, relative to `topk`;
(c) the same steps as tokens/s;
(d) on CUDA, model FLOP utilisation against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gtmoe import routers
from gtmoe.config import ConfigError, ModelConfig, RouterConfig, TrainConfig
from gtmoe.model import MoETransformer
from gtmoe.moe import MoELayer, SwiGLU
from gtmoe.train import autocast_context, build_optimizer, lr_lambda, resolve_device

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
    parser = argparse.ArgumentParser(prog="python -m gtmoe.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run; auto = CUDA when available (default: %(default)s)")
    parser.add_argument("--d-model", type=int, default=256, help="model width (default: %(default)s)")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer, E (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token, k (default: %(default)s)")
    parser.add_argument("--d-expert", type=int, default=None,
                        help="hidden size of one expert (default: 4 * d_model / k, so the dense FFN of equal "
                             "active FLOPs has the usual hidden size 4 * d_model)")
    parser.add_argument("--tokens", type=int, default=4096,
                        help="tokens per forward pass: the MoE layer's routing group, and a train step's "
                             "batch_size * seq_len (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="train-step sequence length (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=2, help="train-step model depth (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="train-step attention heads (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=4096, help="train-step vocabulary size (default: %(default)s)")
    parser.add_argument("--routers", nargs="+", default=None, metavar="NAME",
                        help="variants whose train step is timed (default: every registered router, dense "
                             "included); topk is always added as the reference")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per measurement (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed calls first (allocator, caches, torch.compile) (default: %(default)s)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each train step with the model under torch.compile (as train.compile)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="CUDA only: first run a few eager train steps of each variant under "
                             "torch.cuda.set_sync_debug_mode('error'), failing on any host-device sync")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the GPU for MFU, when its name is not in the built-in table")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; the study's CPU jobs use 1)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and token seed (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the results as JSON to OUT")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)

    for name in ("d_model", "experts", "top_k", "tokens", "seq_len", "layers", "heads", "vocab", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first call pays for allocation and compilation)")
    if args.top_k > args.experts:
        parser.error("--top-k must be <= --experts")
    if args.d_expert is None:
        args.d_expert = 4 * args.d_model // args.top_k
    if args.tokens % args.seq_len:
        parser.error(f"--tokens {args.tokens} must be a multiple of --seq-len {args.seq_len}")
    known = routers.known()
    args.routers = known if args.routers is None else ["topk"] + [r for r in args.routers if r != "topk"]
    unknown = sorted(set(args.routers) - set(known))
    if unknown:
        parser.error(f"unknown router(s) {', '.join(unknown)}; known: {', '.join(known)}")
    try:
        device = resolve_device(args.device)
        model_config(args)
    except (RuntimeError, ConfigError) as exc:
        parser.error(str(exc))
    if args.sync_debug and device.type != "cuda":
        parser.error("--sync-debug needs a CUDA device (it checks CUDA host-device syncs)")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(candidates: dict[str, Callable[[], None]], device: torch.device, warmup: int,
                        repeats: int) -> dict[str, float]:
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


def bench_layer(args: argparse.Namespace, device: torch.device) -> dict:
    """(a) MoE layer with the top-k router against the dense SwiGLU of equal active FLOPs."""
    torch.manual_seed(args.seed)
    router_cls = routers.get("topk")
    router = router_cls(RouterConfig.from_mapping({"name": "topk"}).resolve(), args.d_model, args.experts,
                        args.top_k)
    layers = {
        "moe": MoELayer(router, args.d_model, args.d_expert, args.experts).to(device).train(),
        "dense": SwiGLU(args.d_model, args.top_k * args.d_expert).to(device).train(),
    }
    x = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)
    grad_out = torch.randn(args.tokens, args.d_model, device=device)

    def forward_backward(layer: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            with autocast_context(device):
                y = layer(x)
            outputs, grads = [y], [grad_out.to(y.dtype)]
            if isinstance(layer, MoELayer):  # the router's auxiliary losses are part of its cost
                outputs.append(layer.last_routing.loss)
                grads.append(torch.ones_like(outputs[-1]))
            torch.autograd.backward(outputs, grads)

        return run

    seconds = interleaved_medians({name: forward_backward(layer) for name, layer in layers.items()}, device,
                                  args.warmup, args.repeats)
    return {"moe_s": seconds["moe"], "dense_s": seconds["dense"], "ratio": seconds["moe"] / seconds["dense"],
            "d_expert": args.d_expert, "dense_hidden": args.top_k * args.d_expert}


def model_config(args: argparse.Namespace) -> ModelConfig:
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      max_seq_len=args.seq_len, n_experts=args.experts, top_k=args.top_k, d_expert=args.d_expert)
    cfg.validate()
    return cfg


class TrainStep:
    """One optimizer step of gtmoe/train.py's loop (grad_accum 1), on a fixed batch of random tokens."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device, compiled: bool = False,
                 model: MoETransformer | None = None):
        self.device = device
        self.tcfg = TrainConfig(seed=args.seed, batch_size=args.tokens // args.seq_len)
        if model is None:
            torch.manual_seed(args.seed)  # every variant starts from the same initialisation where shapes agree
            model = MoETransformer(model_config(args), RouterConfig.from_mapping({"name": name}).for_horizon(self.tcfg.max_steps)).to(device)
        self.model = model.train()
        # dynamic=False: compiled like the one model of a training process. Variants share the forward's code
        # object, and automatic dynamic would otherwise turn their differing router options into graph inputs.
        self.forward = torch.compile(model, dynamic=False) if compiled else model
        self.optimizer = build_optimizer(model, self.tcfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.tcfg))
        tokens = torch.randint(0, args.vocab, (self.tcfg.batch_size, args.seq_len + 1),
                               generator=torch.Generator().manual_seed(args.seed))
        self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # on the host, as TokenBlocks
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.step = 0

    def __call__(self) -> None:
        x = self.x.to(self.device, non_blocking=True)
        y = self.y.to(self.device, non_blocking=True)
        with autocast_context(self.device):
            out = self.forward(x, y)
        self.model.observe_token_loss(out.token_loss)
        (out.loss + out.router_loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
        finite = torch.isfinite(out.loss.detach()) & torch.isfinite(grad_norm)
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~finite, self.step, self.first_bad_step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_router_states()
        self.scheduler.step()
        self.step += 1


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


def bench_train_steps(args: argparse.Namespace, device: torch.device) -> dict:
    """(b), (c), (d): step time, tokens/s and MFU of every variant, eager and optionally compiled."""
    steps = {name: TrainStep(name, args, device) for name in args.routers}
    if args.sync_debug:
        check_no_host_sync(steps, device)
    candidates: dict[str, Callable[[], None]] = dict(steps)
    if args.compile:
        for name, step in steps.items():
            candidates[f"{name}+compile"] = TrainStep(name, args, device, compiled=True, model=step.model)
    seconds = interleaved_medians(candidates, device, args.warmup, args.repeats)

    peak = peak_flops(device, args.peak_tflops)
    results = {}
    for name, step in steps.items():
        flops = flops_per_token(step.model, args.seq_len) * args.tokens
        row = {"step_s": seconds[name], "ratio_to_topk": seconds[name] / seconds["topk"],
               "tokens_per_s": args.tokens / seconds[name], "flops_per_step": flops,
               "mfu": flops / seconds[name] / peak if peak else None}
        if args.compile:
            compiled = seconds[f"{name}+compile"]
            row.update({"compiled_step_s": compiled, "compiled_tokens_per_s": args.tokens / compiled,
                        "compile_speedup": seconds[name] / compiled,
                        "compiled_mfu": flops / compiled / peak if peak else None})
        results[name] = row
    return {"variants": results, "peak_flops": peak}


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
    cfg, layer, train = result["config"], result["moe_layer"], result["train_step"]
    lines = [
        (f"device {result['device_name']}, torch {result['torch']}, {result['threads']} threads, "
         f"load average {result['load_average'][0]:.2f} -> {result['load_average'][1]:.2f} "
         f"on {os.cpu_count()} CPUs"),
        (f"(a) MoE layer forward+backward, {cfg['tokens']} tokens, d_model {cfg['d_model']}: "
         f"topk E={cfg['experts']} k={cfg['top_k']} d_expert={layer['d_expert']} {layer['moe_s'] * 1e3:.2f} ms, "
         f"dense SwiGLU hidden {layer['dense_hidden']} {layer['dense_s'] * 1e3:.2f} ms, "
         f"ratio {layer['ratio']:.3f}"),
        (f"(b-d) train step, {cfg['layers']} layers, batch {cfg['tokens'] // cfg['seq_len']} x {cfg['seq_len']}, "
         f"vocab {cfg['vocab']}"),
    ]
    compiled = cfg["compile"]
    header = f"{'variant':<14}{'step ms':>10}{'/ topk':>9}{'tokens/s':>11}{'MFU':>8}"
    if compiled:
        header += f"{'compiled ms':>13}{'tokens/s':>11}{'speedup':>9}"
    lines.append(header)

    def mfu(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    for name, row in train["variants"].items():
        line = (f"{name:<14}{row['step_s'] * 1e3:>10.1f}{row['ratio_to_topk']:>9.3f}"
                f"{row['tokens_per_s']:>11.0f}{mfu(row['mfu']):>8}")
        if compiled:
            line += (f"{row['compiled_step_s'] * 1e3:>13.1f}{row['compiled_tokens_per_s']:>11.0f}"
                     f"{row['compile_speedup']:>9.3f}")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    result = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "moe_layer": bench_layer(args, device),
        "train_step": bench_train_steps(args, device),
    }
    result["load_average"] = [load_before, os.getloadavg()[0]]  # 1-minute, before and after
    print(format_report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
