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

With `--config`, the sizes come from a study config, read as the workflow reads it: each file strictly
(gtmoe.config.load_yaml), merged in order as snakemake --configfile merges them
(snakemake.utils.update_config: mappings key by key, anything else replaced), resolved by
gtmoe.study.Study.from_config, and each variant's run config taken from Study.run_config: model,
batch_size x seq_len tokens, optimizer, lr schedule and every variant's router options (horizon-dependent
ones resolved). Variants default to all of the config's, threads to 1, as the study's jobs run.
"""

# The modules: __main__ (the command line and its config reading), harness (timing), profile (FLOPs, peaks,
# the matmul share, the sync check) and report (the printed table and the JSON).

from gtmoe.bench.harness import EvalStep, ReplayRouter, TrainStep, interleaved_medians
from gtmoe.bench.profile import flops_per_token, matmul_share, peak_flops
from gtmoe.bench.report import format_report

__all__ = [
    "EvalStep",
    "ReplayRouter",
    "TrainStep",
    "flops_per_token",
    "format_report",
    "interleaved_medians",
    "matmul_share",
    "peak_flops",
]
