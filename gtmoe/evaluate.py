"""Evaluation of a trained run: perplexity and every load metric of SPEC §5, per split.

One model load evaluates every requested split. Tokens are routed in groups
of the training micro-batch's size (train.batch_size blocks), so capacity,
expert choice's look-ahead and MaxVio_batch mean what they meant in training;
padding never takes capacity. A split is evaluated whole, or on
`eval.max_blocks` evenly spaced blocks, identical for every run (the JSON
records how many, and their sha256); a subset's word count is then its share
of the split's words in proportion to its tokens. Routing statistics are gathered per MoE layer on the device,
turned into metrics by the pure functions of `gtmoe.metrics`, then averaged over layers; per-layer values are kept.
Token-choice routers also report the load they asked for before any capacity cut (`Routing.choice`: requested_load,
requested_gini, requested_maxvio_global, assignment_drop_rate). What the experts learned comes from the same counts
(gtmoe.contract.SPECIALISATION_METRICS, UTILISATION_METRICS, PER_LAYER_ARRAYS): OLMoE's co-activation (pairs of
experts per token) and vocabulary specialisation, each expert's top token ids, the token-expert MI over its
attainable maximum, and the percentiles of the experts' utilisation over the routing groups, accumulated per batch
on the device with the rest. The validation split also records the final model's routing of the probe (gtmoe.probe:
each token's expert set, for agreement across seeds), after the timed pass. The reported perplexity is the run's
evaluation routing; a router that also offers a non-causal routing (`evaluation_modes()`, expert choice's top-C of
the group) gets a second forward of every group in it, reported as ppl_noncausal, and `causal_routing` says which
the reported one is. The final and the saturation checkpoints are read weights only (mapped, AdamW's state never
read), and only if they are this run's: each records the run that wrote it, and the final one the saturation
checkpoint's sha256. Routing stability over training (gtmoe.stability, STABILITY_METRICS) comes from the routing
snapshots the final checkpoint holds, the same in every split's JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gtmoe import metrics, stability
from gtmoe.config import RunConfig, load_run_config
from gtmoe.contract import (
    CHECKPOINT,
    FLIP_RATE_PREFIX,
    LOAD_METRICS,
    MAX_COACTIVATION_EXPERTS,
    PER_LAYER_ID_KEYS,
    PROBE_SPLIT,
    RUN_CONFIG,
    RUN_OK,
    SATURATION_CHECKPOINT,
    SPECIALISATION_METRICS,
    STABILITY_METRICS,
    TOP_TOKENS,
    UTILISATION_METRICS,
    UTILISATION_PERCENTILES,
)
from gtmoe.data.shards import TokenBlocks
from gtmoe.device import autocast_context, peak_memory_mb, resolve_device
from gtmoe.model import IGNORE_INDEX, MoETransformer, build_model
from gtmoe.probe import pack_expert_sets, probe_block_ids, route_probe
from gtmoe.runfiles import (
    SATURATION_RECORD,
    RunError,
    check_checkpoint_identity,
    check_config_matches_checkpoint,
    check_saturation_checkpoint,
    config_differences,
    describe_differences,
    map_checkpoint,
    retrain_recovery,
)

EVAL_ORDER_SEED = 0  # fixed: every run evaluates the same blocks in the same groups
UTILISATION_PERCENTILES_BY_METRIC = dict(zip(UTILISATION_METRICS, UTILISATION_PERCENTILES.values()))


class LayerStats:
    """Routing statistics of one MoE layer, accumulated over evaluation groups on the device.

    Everything stays a device tensor until `summary()`, so a batch costs no host
    sync and no per-batch allocation of the (vocab x experts) count matrix.
    """

    def __init__(self, n_experts: int, vocab_size: int, device: torch.device):
        self.n_experts = n_experts
        zeros = functools.partial(torch.zeros, dtype=torch.long, device=device)
        self.counts = zeros(n_experts + 1)  # last slot: dropped assignments and padding
        self.joint = zeros(vocab_size * (n_experts + 1))  # flattened (token id, expert) counts
        self.occurrences = zeros(vocab_size)  # valid tokens per token id
        # Flattened (expert, expert) counts of tokens routed to both (OLMoE co-activation); the last row and column
        # take dropped assignments and padding, the diagonal the tokens routed to each expert.
        self.cocounts = zeros((n_experts + 1) ** 2)
        self.group_counts: list[Tensor] = []  # each group's per-expert counts (kept from add: no new allocation)
        self.tokens = zeros(())
        self.tokens_without_expert = zeros(())
        self.batch_maxvio_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.batches = zeros(())
        self.flipped: dict[str, Tensor] = {}  # selection term -> tokens whose top-k set it changed
        self.processed = zeros(())  # valid assignments the experts processed
        # Experts asked for before any capacity cut (`Routing.choice`), per expert; last slot: padding.
        # Stays None for a router without a choice (expert choice): its requested load is undefined.
        self.requested: Tensor | None = None

    def add(self, routing, token_ids: Tensor, valid: Tensor) -> None:
        n_experts = self.n_experts
        kept = (routing.expert < n_experts) & valid[routing.token]
        expert = torch.where(kept, routing.expert, n_experts)  # dropped or padding -> the overflow slot
        counts = torch.zeros_like(self.counts).index_add_(0, expert, torch.ones_like(expert))[:n_experts]
        self.counts[:n_experts] += counts
        self.group_counts.append(counts)
        self.occurrences.index_add_(0, token_ids, valid.long())
        self._add_coactivation(routing, expert, valid.shape[0])
        self.processed += counts.sum()
        if routing.choice is not None:
            requested = torch.where(valid.unsqueeze(-1), routing.choice, n_experts).reshape(-1)
            if self.requested is None:
                self.requested = torch.zeros_like(self.counts)
            self.requested.index_add_(0, requested, torch.ones_like(requested))
        mean = counts.double().mean()
        self.batch_maxvio_sum += torch.where(mean > 0, counts.max() / mean - 1, 0.0)
        self.batches += (mean > 0).long()
        self.joint.index_add_(0, token_ids[routing.token] * (n_experts + 1) + expert, torch.ones_like(expert))
        per_token = torch.zeros_like(valid, dtype=torch.long).index_add_(0, routing.token, kept.long())
        n_valid = valid.sum()
        self.tokens += n_valid
        self.tokens_without_expert += ((per_token == 0) & valid).sum()
        for key, rate in routing.metrics.items():
            if key.startswith(FLIP_RATE_PREFIX):  # a rate over the group's valid tokens: back to a count
                self.flipped[key] = self.flipped.get(key, 0) + rate.double() * n_valid

    def _add_coactivation(self, routing, expert: Tensor, n_tokens: int) -> None:
        """Count each pair of experts that one token reached, `expert` the routing's experts with dropped assignments
        and padding on the overflow slot E. A token-choice routing (k slots per token, token-major) adds its k x k
        slot pairs; any other routing, or one whose k x k pairs would outgrow a (tokens, E + 1) membership matrix,
        adds membership^T membership (exact in float32: a group's count is far below 2**24)."""
        slots = self.n_experts + 1
        k = routing.choice.shape[1] if routing.choice is not None else None
        if k is not None and 2 * k * k <= slots:  # 8 k^2 bytes per token of pairs against 4 (E + 1) of membership
            per_token = expert.view(-1, k)
            pairs = (per_token.unsqueeze(2) * slots + per_token.unsqueeze(1)).reshape(-1)
            self.cocounts.index_add_(0, pairs, torch.ones_like(pairs))
            return
        member = torch.zeros(n_tokens, slots, dtype=torch.float32, device=expert.device)
        member.index_put_((routing.token, expert), torch.ones_like(expert, dtype=torch.float32), accumulate=True)
        member.clamp_(max=1.0)  # a token counts once per expert
        both = (member.T @ member).round().long()
        self.cocounts.view(slots, slots).add_(both)

    def summary(self, layer: int) -> dict:
        counts = self.counts[: self.n_experts].cpu().numpy()
        joint = self.joint.view(-1, self.n_experts + 1)[:, : self.n_experts]
        specialisation = self._specialisation(joint, counts)
        load = metrics.load_metrics(counts)
        tokens, batches = int(self.tokens), int(self.batches)
        processed = int(self.processed)
        requested, asked = None, {"gini": float("nan"), "maxvio": float("nan")}
        if self.requested is not None:
            requested = self.requested[: self.n_experts].cpu().numpy()
            asked = metrics.load_metrics(requested)
        n_requested = int(requested.sum()) if requested is not None else 0
        return {
            "layer": layer,
            "load": counts.tolist(),
            "gini": load["gini"],
            "load_entropy": load["load_entropy"],
            "cv": load["cv"],
            "maxvio_global": load["maxvio"],
            "maxvio_batch": float(self.batch_maxvio_sum) / batches if batches else float("nan"),
            "dead_experts": load["dead_experts"],
            "drop_rate": int(self.tokens_without_expert) / max(tokens, 1),
            "token_expert_mi": specialisation.pop("token_expert_mi"),
            "experts_per_token": processed / tokens if tokens else float("nan"),
            "requested_load": requested.tolist() if requested is not None else None,
            "requested_gini": asked["gini"],
            "requested_maxvio_global": asked["maxvio"],
            "assignment_drop_rate": 1 - processed / n_requested if n_requested else float("nan"),
            **{key: float(flipped) / max(tokens, 1) for key, flipped in self.flipped.items()},
            **specialisation,
        }

    def _specialisation(self, joint: Tensor, load: np.ndarray) -> dict:
        """What the experts learned (gtmoe.contract.SPECIALISATION_METRICS, UTILISATION_METRICS, PER_LAYER_ARRAYS),
        computed once from the accumulated counts: the same values as gtmoe.metrics' functions of them."""
        occurrences = self.occurrences.cpu().numpy()
        n_tokens = int(occurrences.sum())
        mi, mi_share_of_max = token_expert_information(joint, occurrences)
        best = float(joint.max(dim=1).values.sum()) if joint.numel() else 0.0  # sum_t max_e N[t, e]
        floor = float(load.sum()) / (n_tokens * self.n_experts) if n_tokens else math.nan
        score = best / n_tokens if n_tokens else math.nan
        top_ids, top_counts = top_token_ids(joint, TOP_TOKENS)
        with np.errstate(invalid="ignore", divide="ignore"):
            top_share = np.where(load > 0, top_counts.sum(axis=1) / load, np.nan)
        slots = self.n_experts + 1
        cocounts = self.cocounts.view(slots, slots)[: self.n_experts, : self.n_experts]
        utilisation = (
            utilisation_percentiles(torch.stack(self.group_counts), UTILISATION_PERCENTILES_BY_METRIC)
            if self.group_counts
            else dict.fromkeys(UTILISATION_METRICS, math.nan)
        )
        return {
            "token_expert_mi": mi,
            "token_expert_mi_share_of_max": mi_share_of_max,
            **coactivation_summary(cocounts),
            "vocab_specialisation": score,
            "vocab_specialisation_above_floor": (score - floor) / (1 - floor) if floor < 1 else math.nan,
            "top_token_share": float(np.nanmean(top_share)) if np.isfinite(top_share).any() else math.nan,
            **utilisation,
            "coactivation": cocounts.cpu().tolist() if self.n_experts <= MAX_COACTIVATION_EXPERTS else None,
            "top_tokens": top_ids.tolist(),
            "top_token_counts": top_counts.tolist(),
        }


MI_CHUNK_ELEMENTS = 1 << 20  # (token id, expert) counts turned into floats at a time: about 40 MB in flight


def token_expert_mutual_information(joint: Tensor) -> float:
    """metrics.token_expert_mutual_information of a (vocab, E) count matrix, bit for bit (token_expert_information)."""
    return token_expert_information(joint)[0]


def token_expert_information(joint: Tensor, occurrences: np.ndarray | None = None) -> tuple[float, float]:
    """metrics.token_expert_mutual_information of a (vocab, E) count matrix, bit for bit, in row chunks; and, given
    each token id's occurrences, metrics.token_expert_mi_share_of_max (NaN without them).

    The metric converts the whole matrix to float64 probabilities and masks them (17 bytes per entry, over
    4 GB at a 65,536-token vocabulary and 4,096 experts); here only MI_CHUNK_ELEMENTS entries are in flight
    (copied to the host chunk by chunk from any device), and the nonzero probabilities are kept (16 bytes
    each, at most top_k per evaluated token). The result is identical: column sums accumulate row after
    row as numpy's axis-0 sum does, row sums and the masked nonzero entries are per row, and the entropies
    are the same numpy sums over the same arrays (tests/test_hardening_checkpoints.py checks the bits).
    """
    n_rows, n_experts = joint.shape
    total = float(joint.sum())  # counts are integers: the float64 sum is exact in any order below 2**53
    if total == 0:
        return float("nan"), float("nan")
    columns, rows, nonzero = None, [], []
    step = max(1, MI_CHUNK_ELEMENTS // n_experts)
    for start in range(0, n_rows, step):
        p = np.asarray(joint[start : start + step].cpu().numpy(), dtype=np.float64) / total
        if n_experts > 1:  # a (vocab, 1) matrix is a contiguous vector, which numpy sums pairwise: below
            columns = p.sum(axis=0) if columns is None else np.concatenate([columns[None], p]).sum(axis=0)
        rows.append(p.sum(axis=1))
        nonzero.append(p[p > 0])
        del p
    row_sums = np.concatenate(rows)
    if n_experts == 1:
        columns = np.array([row_sums.sum()])
    del rows
    h_expert, h_token = _entropy(columns), _entropy(row_sums)
    floor = math.nan if occurrences is None else metrics.conditional_entropy_floor(row_sums, total, occurrences)
    del row_sums
    p = np.concatenate(nonzero)
    del nonzero
    plogp = np.log(p)
    np.multiply(p, plogp, out=plogp)
    del p
    h_joint = float(-np.sum(plogp))
    mi = max(h_token + h_expert - h_joint, 0.0)  # clip float round-off below zero
    share_of_max = math.nan if occurrences is None else metrics.share_of_attainable_max(mi, h_expert, h_token, floor)
    return (mi / h_expert if h_expert > 0 else 0.0), share_of_max


def coactivation_summary(cocounts: Tensor) -> dict[str, float]:
    """metrics.coactivation_summary of an (E, E) count matrix, computed where the counts are: the host holds no
    (E x E) copy (4,096 experts: 134 MB a copy) beyond the JSON's, which stops at MAX_COACTIVATION_EXPERTS."""
    own = cocounts.diagonal()
    shares = cocounts.double() / own.unsqueeze(1)  # rows of experts without tokens: NaN or inf, left out below
    shares.fill_diagonal_(-1.0)  # below every share: a row's maximum is its strongest partner, if it has one
    partner = shares.max(dim=1).values
    partner = partner[(own > 0) & (partner >= 0)].tolist()
    return {
        "coactivation_max": max(partner) if partner else math.nan,
        "coactivation_partner_mean": float(np.mean(partner)) if partner else math.nan,
    }


def utilisation_percentiles(group_counts: Tensor, percentiles: dict[str, float]) -> dict[str, float]:
    """metrics.utilisation_percentiles of a (groups, E) count matrix, computed where the counts are: a GPU job's
    host then holds no (groups x E) copy (4,096 experts in 2**17 groups would be 4 GB). Numpy's linear
    interpolation between the sorted values, written out: torch.quantile refuses more than 2**24 values."""
    totals = group_counts.sum(dim=1, keepdim=True)
    used = (totals > 0).squeeze(1)
    values = (group_counts.shape[1] * group_counts.double() / totals.clamp(min=1))[used].flatten().sort().values
    if values.numel() == 0:
        return dict.fromkeys(percentiles, math.nan)
    position = torch.tensor(list(percentiles.values()), dtype=torch.float64, device=values.device)
    position = position / 100 * (values.numel() - 1)
    low = position.floor().long()
    high = position.ceil().long()
    result = values[low] + (values[high] - values[low]) * (position - low)
    return dict(zip(percentiles, result.tolist()))


def top_token_ids(joint: Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each expert's `n` most routed token ids, most first and ties to the lower id, and their counts: two (E, n)
    arrays (n capped at the vocabulary) from a (vocab, E) count matrix, in column chunks of at most
    MI_CHUNK_ELEMENTS sort keys (count * vocab + vocab - 1 - id: unique, so the order is exact)."""
    n_rows, n_experts = joint.shape
    n = min(n, n_rows)
    ids, counts = [], []
    step = max(1, MI_CHUNK_ELEMENTS // max(n_rows, 1))
    reverse_id = (n_rows - 1 - torch.arange(n_rows, device=joint.device)).unsqueeze(1)
    for start in range(0, n_experts, step):
        keys = joint[:, start : start + step] * n_rows + reverse_id
        top = keys.topk(n, dim=0).values.T.cpu().numpy()  # (experts in the chunk, n)
        ids.append(n_rows - 1 - top % n_rows)
        counts.append(top // n_rows)
    empty = np.zeros((0, n), dtype=np.int64)
    return (np.concatenate(ids) if ids else empty), (np.concatenate(counts) if counts else empty)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


class SaturationStats:
    """OLMoE router saturation of one layer: sum over valid tokens of |TopK_early ∩ TopK_final| / k."""

    def __init__(self, device: torch.device):
        self.overlap = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.long, device=device)

    def add(self, early: Tensor, final: Tensor, valid: Tensor) -> None:
        overlap = (early.unsqueeze(-1) == final.unsqueeze(-2)).any(dim=-1).sum(dim=-1) / early.shape[-1]
        self.overlap += (overlap * valid).sum()
        self.tokens += valid.sum()

    def value(self) -> float | None:
        tokens = int(self.tokens)
        return float(self.overlap) / tokens if tokens else None


def evaluation_routing(model: MoETransformer) -> tuple[bool, str | None]:
    """Whether every MoE layer's evaluation routing is causal (a token's routing uses only that token and
    its past), and the non-causal mode to evaluate as well (None: none, or the reported one already is).

    A router declares its modes with `evaluation_modes()` (mode -> causal) and holds the one in force in
    `evaluation_mode`; one without them routes each token by itself and counts as causal (a router that
    chooses among the group's tokens at evaluation must declare its modes, as expert choice does).
    """
    causal, noncausal = True, None
    for layer in model.moe_layers:
        router = layer.router
        modes = router.evaluation_modes() if hasattr(router, "evaluation_modes") else None
        if modes is None:
            continue
        causal = causal and modes[router.evaluation_mode]
        noncausal = noncausal or next((mode for mode, is_causal in modes.items() if not is_causal), None)
    return causal, noncausal if causal else None


@contextlib.contextmanager
def routing_mode(model: MoETransformer, mode: str):
    """Every router that offers evaluation mode `mode` routes in it, until the block ends."""
    routers = [
        layer.router
        for layer in model.moe_layers
        if hasattr(layer.router, "evaluation_modes") and mode in layer.router.evaluation_modes()
    ]
    previous = [router.evaluation_mode for router in routers]
    try:
        for router in routers:
            router.evaluation_mode = mode
        yield
    finally:
        for router, old in zip(routers, previous):
            router.evaluation_mode = old


def _total_nll(model: MoETransformer, data: TokenBlocks, blocks: np.ndarray, group: int, dev: torch.device) -> float:
    """The summed token NLL of `blocks`, routed in groups of `group` blocks as the evaluation routes them."""
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for start in range(0, len(blocks), group):
        x, y = data.batch(blocks[start : start + group])
        with autocast_context(dev):
            total += model(x.to(dev), y.to(dev)).token_loss.double().sum()
    return float(total)


def _mean_over_layers(values: list) -> float:
    """Mean of one metric over layers; NaN where any layer's is undefined (None or NaN)."""
    return float(np.mean([math.nan if value is None else value for value in values]))


def evaluation_blocks(n_blocks: int, max_blocks: int) -> np.ndarray:
    """The blocks every run evaluates, in evaluation order; the same for every variant and seed.

    `max_blocks` evenly spaced blocks (0: all of them), then shuffled with a fixed seed, so that a
    routing group is a random sample of the split, as a training micro-batch is of the train split.
    """
    chosen = np.arange(n_blocks)
    if 0 < max_blocks < n_blocks:
        chosen = np.unique(np.linspace(0, n_blocks - 1, max_blocks).round().astype(np.int64))
    return np.random.default_rng(EVAL_ORDER_SEED).permutation(chosen)


def _load_weights(cfg: RunConfig, state: dict, device: torch.device) -> MoETransformer:
    """The model of a mapped checkpoint (runfiles.map_checkpoint): only its weights are read."""
    model = build_model(cfg).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


def _load_final(run_dir: Path, cfg: RunConfig, device: torch.device) -> tuple[MoETransformer, int, object, list]:
    """The finished run's model, its step, what it records of the saturation checkpoint, and each MoE layer's
    routing stability from its routing snapshots (gtmoe.stability.per_layer); the checkpoint is unmapped on
    return, so AdamW's state beside the weights is never read."""
    path = run_dir / CHECKPOINT
    state, _ = map_checkpoint(path)
    check_config_matches_checkpoint(run_dir / RUN_CONFIG, cfg, path, state.get("config"))
    check_checkpoint_identity(path, state, cfg)
    if not state.get("complete"):
        raise RunError(
            f"{path} is from step {state['step']} of {cfg.train.max_steps}: "
            f"training is not finished; rerun `python -m gtmoe train --out {run_dir}` first"
        )
    model = _load_weights(cfg, state, device)
    layers = stability.per_layer(state.get(stability.SNAPSHOT_RECORD), len(model.moe_layers), cfg.train.max_steps)
    return model, state["step"], state.get(SATURATION_RECORD), layers


def _load_saturation(run_dir: Path, cfg: RunConfig, record, device: torch.device) -> MoETransformer:
    """The saturation checkpoint's model, after checking that this run wrote it (runfiles)."""
    path = run_dir / SATURATION_CHECKPOINT
    if not path.exists():
        raise RunError(
            f"checkpoint {path} is missing, and the run's router saturation is measured against it; "
            f"{retrain_recovery(path)}"
        )
    state, entry = map_checkpoint(path)
    check_checkpoint_identity(path, state, cfg)
    differences = config_differences(state.get("config") or {}, cfg.to_dict())
    if differences:
        raise RunError(
            f"checkpoint {path} was written by another run: "
            f"{describe_differences(differences, path.name, RUN_CONFIG)}; {retrain_recovery(path)}"
        )
    check_saturation_checkpoint(path, state, entry, run_dir / CHECKPOINT, record)
    return _load_weights(cfg, state, device)


@torch.no_grad()
def evaluate(run_dir: str | Path, split: str, *, device: str | None = None) -> dict:
    """Every metric of one split (see `evaluate_splits`)."""
    return evaluate_splits(run_dir, [split], device=device)[split]


@torch.no_grad()
def evaluate_splits(
    run_dir: str | Path, splits: list[str], *, device: str | None = None, study_run: RunConfig | None = None
) -> dict[str, dict]:
    """Perplexity and load metrics of a finished run on each split, from a single load of the model.

    `study_run` is the run config the study asks for (the workflow passes the one of study.json): the run
    must be that run (gtmoe.contract.weight_config), and its `eval` section replaces the run's own, so
    editing it needs no retraining. By default the run's config.yaml gives the settings.

    Routing groups are the training micro-batch (train.batch_size blocks of seq_len tokens), so
    capacities, expert choice's look-ahead and MaxVio_batch mean what they meant in training.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir / RUN_CONFIG)
    if device:
        dev = resolve_device(device, "--device")
    else:
        dev = resolve_device(cfg.train.device, f"{run_dir / RUN_CONFIG} key 'train.device'")
    model, train_step, saturation, stable = _load_final(run_dir, cfg, dev)
    if study_run is not None:
        differences = config_differences(cfg.to_dict(), study_run.to_dict())
        if differences:
            raise RunError(
                f"{run_dir} is not the run the study asks for: "
                f"{describe_differences(differences, run_dir / RUN_CONFIG, 'the study')}; "
                f"retrain it (delete {run_dir} and rerun snakemake)"
            )
        cfg = dataclasses.replace(cfg, eval=study_run.eval)
    # Router saturation compares the final routing with the one this run had at its saturation checkpoint.
    early = _load_saturation(run_dir, cfg, saturation, dev) if model.moe_layers else None
    return {
        split: _with_stability(_evaluate_split(cfg, model, early, split, dev, train_step), stable) for split in splits
    }


def _with_stability(result: dict, layers: list[dict]) -> dict:
    """A split's result with the routing stability of each MoE layer (`layers`, gtmoe.stability.per_layer) in its
    `per_layer` entry and their mean over layers beside the other metrics (null without snapshots or layers)."""
    for entry, values in zip(result["per_layer"], layers):
        entry.update(_finite_or_none(values))
    means = {
        name: _mean_over_layers([values[name] for values in layers]) if layers else None for name in STABILITY_METRICS
    }
    per_layer = result.pop("per_layer")
    return {**result, **_finite_or_none(means), "per_layer": per_layer}


def _evaluate_split(
    cfg, model: MoETransformer, early: MoETransformer | None, split: str, dev: torch.device, train_step: int
) -> dict:
    data = TokenBlocks(Path(cfg.data.shards) / split)
    group = cfg.train.batch_size
    blocks = evaluation_blocks(len(data), cfg.eval.max_blocks.get(split, 0))
    saturation_blocks = cfg.eval.saturation_blocks or len(blocks)
    stats = [LayerStats(cfg.model.n_experts, cfg.model.vocab_size, dev) for _ in model.moe_layers]
    saturation = [SaturationStats(dev) for _ in model.moe_layers]
    nll_sum = torch.zeros((), dtype=torch.float64, device=dev)
    n_tokens = torch.zeros((), dtype=torch.long, device=dev)
    causal, noncausal_mode = evaluation_routing(model)

    t0 = time.perf_counter()
    for start in range(0, len(blocks), group):
        x, y = data.batch(blocks[start : start + group])
        x, y = x.to(dev), y.to(dev)
        valid = (y != IGNORE_INDEX).reshape(-1)
        with autocast_context(dev):
            out = model(x, y)
        nll_sum += out.token_loss.double().sum()
        n_tokens += valid.sum()
        flat_ids = x.reshape(-1)
        for layer_stats, layer in zip(stats, model.moe_layers):
            layer_stats.add(layer.last_routing, flat_ids, valid)
        if early is not None and start < saturation_blocks:
            with autocast_context(dev):
                early(x, y)
            for layer_saturation, a, b in zip(saturation, early.moe_layers, model.moe_layers):
                if a.last_routing.choice is not None:
                    layer_saturation.add(a.last_routing.choice, b.last_routing.choice, valid)
    per_layer = [s.summary(i) for i, s in enumerate(stats)]  # the host reads the totals once, here
    wall_s = time.perf_counter() - t0

    nll_sum, n_tokens = float(nll_sum), int(n_tokens)
    words = data.n_words * n_tokens / max(data.n_tokens - 1, 1) if len(blocks) < len(data) else data.n_words
    # The non-causal perplexity: the reported one where that routes non-causally, else a pass of its own, after
    # the timed one (wall_s and tokens/s stay those of the reported evaluation).
    nll_noncausal = None if causal else nll_sum
    if noncausal_mode is not None:
        with routing_mode(model, noncausal_mode):
            nll_noncausal = _total_nll(model, data, blocks, group, dev)
    saturation_values = [v for v in (s.value() for s in saturation) if v is not None]
    probe = _probe_routing(cfg, model, data, dev) if split == PROBE_SPLIT and model.moe_layers else None
    if probe is not None:  # after the timed pass: wall_s stays the evaluation's
        probe, packed = probe
        for layer, sets in zip(per_layer, packed):
            layer["probe_sets"] = sets
    n_params, n_active = model.parameter_counts()
    result = {
        "variant": cfg.variant,
        "seed": cfg.train.seed,
        "split": split,
        "router": cfg.router.name,
        "status": RUN_OK,
        "ppl": metrics.perplexity(nll_sum, n_tokens),
        "word_ppl": metrics.perplexity(nll_sum, words),
        "nll": nll_sum / max(n_tokens, 1),
        "tokens": n_tokens,
        "words": words,
        "causal_routing": 1.0 if causal else 0.0,
        "ppl_noncausal": None if nll_noncausal is None else metrics.perplexity(nll_noncausal, n_tokens),
        "word_ppl_noncausal": None if nll_noncausal is None else metrics.perplexity(nll_noncausal, words),
        "nll_noncausal": None if nll_noncausal is None else nll_noncausal / max(n_tokens, 1),
    }
    layer_metrics = (
        [name for name in per_layer[0] if name not in PER_LAYER_ID_KEYS]
        if per_layer
        else (*LOAD_METRICS, *SPECIALISATION_METRICS, *UTILISATION_METRICS)
    )
    for name in layer_metrics:
        result[name] = _mean_over_layers([layer[name] for layer in per_layer]) if per_layer else None
    result.update(
        {
            "router_saturation": float(np.mean(saturation_values)) if saturation_values else None,
            "n_params": n_params,
            "n_active_params": n_active,
            "tokens_per_s": n_tokens / wall_s if wall_s > 0 else None,
            "wall_s": wall_s,
            "peak_mem_mb": peak_memory_mb(dev),
            "device": str(dev),
            "n_experts": cfg.model.n_experts if model.moe_layers else 0,
            "top_k": cfg.model.top_k,
            "train_step": train_step,
            # How the split was evaluated: routing-group size, and which blocks (identical for every run).
            "group_tokens": group * data.seq_len,
            "eval_blocks": int(len(blocks)),
            "split_blocks": len(data),
            "eval_blocks_sha256": hashlib.sha256(np.sort(blocks).tobytes()).hexdigest(),
            "probe": probe,
            "per_layer": per_layer,
        }
    )
    return _finite_or_none(result)


def _probe_routing(cfg: RunConfig, model: MoETransformer, data: TokenBlocks, dev: torch.device):
    """The final model's routing of the probe (gtmoe.probe; None without one): what the JSON records of the probe
    (its blocks, tokens, their sha256 and which tokens are real, packed) and each MoE layer's expert sets, packed.
    Agreement across seeds compares these between the runs of a variant (analysis.stats.stability)."""
    blocks = probe_block_ids(len(data), cfg.eval.probe_blocks)
    if not len(blocks):
        return None
    x, y = data.batch(blocks)
    sets, valid = route_probe(model, x.to(dev), y.to(dev), cfg.train.batch_size, dev)
    sets, valid = sets.cpu().numpy(), valid.cpu().numpy()  # one read, once per evaluation
    record = {
        "blocks": int(len(blocks)),
        "tokens": int(valid.size),
        "blocks_sha256": hashlib.sha256(blocks.tobytes()).hexdigest(),
        "valid": pack_expert_sets(valid[:, None]),
    }
    return record, [pack_expert_sets(layer) for layer in sets]


def _finite_or_none(obj):
    """JSON has no NaN: undefined values (e.g. a metric of an empty layer) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj
