"""Routing stability over training (StableMoE, Dai et al. 2022, arXiv 2204.08396): how often the probe's tokens
change experts between routing snapshots, and when each token's routing last changes.

Training snapshots the routing probe (gtmoe.probe: `eval.probe_blocks` validation blocks, the same for every run)
at step 0 and at `train.routing_snapshots` evenly spaced steps (`TrainConfig.snapshot_steps`), routed in eval mode,
and keeps the expert sets in its checkpoints under SNAPSHOT_RECORD, a bit per (token, expert) (`pack_snapshot`).
The evaluation turns them into the metrics of gtmoe.contract.STABILITY_METRICS and the arrays of PER_LAYER_ARRAYS,
per MoE layer, over the probe's valid tokens (padding excluded); a token's routing is its expert set, so a dropped
token (an empty set) counts like any other set:

- `routing_fluctuation`: the mean over consecutive snapshot pairs of the share of tokens whose expert set changes
  (`fluctuation_curve`: one share per pair); `routing_fluctuation_last`: that share in the last interval;
- a token's last fluctuation step: the last snapshot step at which its expert set differs from its set at the
  final snapshot, 0 if it never does (StableMoE: "the last step where its target expert is different from the
  final step", read at the snapshots); `last_fluctuation_median` is its median over tokens as a fraction of
  max_steps, `late_fluctuation_share` the share of tokens whose step exceeds LATE_FRACTION of training, and
  `settled_curve` the share of tokens settled at each snapshot: their expert set at it and at every later snapshot
  is their final one (the last fluctuation step is earlier, or there is none). It is 1 at the final snapshot.

Pure functions of arrays: numpy here, torch only to pack a snapshot where training keeps it (its device).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from gtmoe.contract import STABILITY_METRICS

SNAPSHOT_RECORD = "routing_snapshots"  # the checkpoints' key of the snapshot record (`snapshot_record`)
LATE_FRACTION = 0.2  # StableMoE: the share of tokens whose last fluctuation step exceeds 20% of training
STABILITY_ARRAYS = ("snapshot_steps", "fluctuation_curve", "settled_curve")
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy.packbits' order: the first expert is the highest bit


def pack_snapshot(sets: Tensor) -> Tensor:
    """(..., n_experts) bool expert sets as (..., ceil(n_experts / 8)) uint8, a bit per expert in numpy.packbits'
    order, computed where `sets` is (no host sync)."""
    n_experts = sets.shape[-1]
    padded = torch.nn.functional.pad(sets.to(torch.uint8), (0, -n_experts % 8))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=sets.device)
    return (padded.unflatten(-1, (-1, 8)) * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_snapshots(packed: np.ndarray, n_experts: int) -> np.ndarray:
    """The bool expert sets `pack_snapshot` packed: (..., n_experts)."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=n_experts).astype(bool)


def snapshot_record(steps: list[int], packed: Tensor, valid: Tensor, blocks: np.ndarray, n_experts: int) -> dict:
    """What a checkpoint keeps of the snapshots: their steps, the packed sets (S, n_moe_layers, N, ceil(E / 8))
    uint8 and `valid` (N,) bool on the host, the probe's validation block ids and the number of experts."""
    return {
        "steps": [int(step) for step in steps],
        "sets": packed.cpu(),
        "valid": valid.cpu(),
        "probe_blocks": [int(block) for block in blocks],
        "n_experts": int(n_experts),
    }


def layer_stability(sets: np.ndarray, valid: np.ndarray, steps: np.ndarray, max_steps: int) -> dict:
    """STABILITY_METRICS and STABILITY_ARRAYS of one layer: `sets` (S, N, E) bool, the expert sets of the N probe
    tokens at the S snapshot `steps` (ascending, the last the final one), `valid` (N,) bool the tokens counted.
    Undefined values (no valid token, fewer than two snapshots) are NaN."""
    sets = np.asarray(sets, dtype=bool)[:, np.asarray(valid, dtype=bool)]
    steps = np.asarray(steps, dtype=np.int64)
    n_snapshots, n_tokens = sets.shape[:2]
    changed = (sets[1:] != sets[:-1]).any(axis=-1)  # (S - 1, N): a token's set changed in that interval
    differs = (sets != sets[-1:]).any(axis=-1)  # (S, N): a token's set differs from its final one
    # The index of the last snapshot at which each token's set differs from its final one (-1: none), and its step
    # (0 where none does).
    last_index = np.where(differs.any(axis=0), n_snapshots - 1 - np.argmax(differs[::-1], axis=0), -1)
    last = np.where(last_index >= 0, steps[last_index], 0)
    if n_tokens == 0:
        curve = np.full(max(n_snapshots - 1, 0), math.nan)
        settled = np.full(n_snapshots, math.nan)
    else:
        curve = changed.mean(axis=1)
        # Settled at snapshot j: its set at every snapshot from j on is its final one.
        settled = (last_index[None, :] < np.arange(n_snapshots)[:, None]).mean(axis=1)
    defined = n_tokens > 0 and n_snapshots > 1
    return {
        "routing_fluctuation": float(curve.mean()) if defined else math.nan,
        "routing_fluctuation_last": float(curve[-1]) if defined else math.nan,
        "last_fluctuation_median": float(np.median(last)) / max_steps if defined else math.nan,
        "late_fluctuation_share": float((last > LATE_FRACTION * max_steps).mean()) if defined else math.nan,
        "snapshot_steps": steps.tolist(),
        "fluctuation_curve": curve.tolist(),
        "settled_curve": settled.tolist(),
    }


def per_layer(record: dict | None, n_layers: int, max_steps: int) -> list[dict]:
    """Each of `n_layers` MoE layers' stability (`layer_stability`) from a checkpoint's snapshot record; every value
    None for a run without one (trained before snapshots, or with routing_snapshots 0)."""
    if not record or not record.get("steps"):
        return [dict.fromkeys((*STABILITY_METRICS, *STABILITY_ARRAYS)) for _ in range(n_layers)]
    # Copied: the checkpoint they are mapped from is let go.
    packed = np.array(torch.as_tensor(record["sets"]).numpy(), dtype=np.uint8)
    valid = np.array(torch.as_tensor(record["valid"]).numpy(), dtype=bool)
    steps = np.asarray(record["steps"], dtype=np.int64)
    return [
        layer_stability(unpack_snapshots(packed[:, layer], record["n_experts"]), valid, steps, max_steps)
        for layer in range(n_layers)
    ]
