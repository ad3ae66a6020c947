"""The benchmark's report: the printed table and the JSON file."""

from __future__ import annotations

import json
import os
from pathlib import Path


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
            + (f"; compiled: torch.compile backend {cfg['compile_backend']}" if cfg["compile"] else "")
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


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
