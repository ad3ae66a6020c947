"""The timing harness: every number a median over interleaved rounds of timed calls after untimed ones.

(a) the MoE layer against the dense SwiGLU of equal active FLOPs, and its split (experts alone, a replayed
routing); (b-d) every variant's train step (eager, optionally compiled) and evaluation group; the fp32 GEMM
peak the FLOP rates are measured against.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from gtmoe import routers
from gtmoe.bench.profile import check_no_host_sync, flops_per_token, matmul_share, peak_flops
from gtmoe.config import RouterConfig, RunConfig
from gtmoe.device import autocast_context
from gtmoe.evaluate import LayerStats
from gtmoe.ffn import SwiGLU
from gtmoe.model import IGNORE_INDEX, MoETransformer, build_model
from gtmoe.moe import MoELayer
from gtmoe.routers.base import Routing, expert_counts
from gtmoe.step import build_optimizer, lr_lambda, train_step


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


class ReplayRouter(torch.nn.Module):
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
    replay = MoELayer(ReplayRouter(routing, args.experts), args.d_model, args.d_expert, args.experts)
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
        backend: str = "inductor",
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
        self.forward = torch.compile(model, dynamic=False, backend=backend) if compiled else model
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
                args.runs[name], args.seq_len, device, compiled=True, model=step.model, backend=args.compile_backend
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
