"""The routing probe: a fixed set of validation blocks whose routing is recorded token by token.

Two analyses need to know which experts each token went to, not only how many tokens each expert took:
routing stability over training (StableMoE, Dai et al. 2022, arXiv 2204.08396: the same tokens routed at
several training steps) and agreement across seeds (the same tokens routed by two seeds' models). Both route
the same tokens: `eval.probe_blocks` validation blocks evenly spaced over the split, identical for every run
(`probe_block_ids`). A token's routing is its expert set, the experts that processed it (after any capacity
cut), so it means the same for token choice, expert choice and dropped tokens.

The probe is routed as the evaluation routes: in eval mode, in groups of the training micro-batch
(train.batch_size blocks), under the evaluation's autocast. Routing in eval mode changes no router state and
draws no random numbers (the routers' state updates, noise and losses are training-only), so a probe taken
during training leaves the run's weights as they would be without it.

Expert sets are stored packed, a bit per (token, expert) (`pack_expert_sets`, `unpack_expert_sets`): the
probe of 16 blocks of 64 tokens with 8 experts is 1 KiB per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gtmoe.contract import IGNORE_INDEX

if TYPE_CHECKING:  # torch is imported where a model is routed: the analysis unpacks sets without it
    import torch
    from torch import Tensor


def probe_block_ids(n_blocks: int, probe_blocks: int) -> np.ndarray:
    """The probe's block indices, ascending: `probe_blocks` evenly spaced blocks of a split of `n_blocks`
    (all of them when it has no more). The same for every run, variant and seed of a study."""
    if probe_blocks <= 0 or n_blocks <= 0:
        return np.zeros(0, dtype=np.int64)
    if probe_blocks >= n_blocks:
        return np.arange(n_blocks, dtype=np.int64)
    return np.unique(np.linspace(0, n_blocks - 1, probe_blocks).round().astype(np.int64))


def expert_sets(routing, n_tokens: int, n_experts: int) -> Tensor:
    """(n_tokens, n_experts) bool: which experts processed each token of one routing group (`Routing`:
    assignments `expert`, `token`; `expert == n_experts` is a dropped assignment, and sets no bit)."""
    import torch

    sets = torch.zeros(n_tokens, n_experts + 1, dtype=torch.bool, device=routing.expert.device)
    sets[routing.token, routing.expert] = True
    return sets[:, :n_experts]


def route_probe(model, inputs: Tensor, targets: Tensor, group: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The probe's routing by `model`: expert sets (n_moe_layers, N, n_experts) bool and `valid` (N,) bool,
    N = the probe's tokens (`inputs`, `targets`: (blocks, seq_len), already on `device`), routed in eval mode
    in groups of `group` blocks. The model's train/eval mode is restored on return. No host sync."""
    import torch

    from gtmoe.device import autocast_context

    was_training = model.training
    model.eval()
    try:
        n_experts = model.moe_layers[0].n_experts if model.moe_layers else 0
        per_group = []
        for start in range(0, inputs.shape[0], group):
            x, y = inputs[start : start + group], targets[start : start + group]
            with torch.no_grad(), autocast_context(device):
                model(x, y)
            n_tokens = x.numel()
            per_group.append(
                torch.stack([expert_sets(layer.last_routing, n_tokens, n_experts) for layer in model.moe_layers])
                if model.moe_layers
                else torch.zeros(0, n_tokens, 0, dtype=torch.bool, device=device)
            )
        sets = torch.cat(per_group, dim=1) if per_group else torch.zeros(0, 0, 0, dtype=torch.bool, device=device)
        valid = (targets != IGNORE_INDEX).reshape(-1)
        return sets, valid
    finally:
        model.train(was_training)


def pack_expert_sets(sets: np.ndarray) -> str:
    """A (N, n_experts) bool array as a hex string, a bit per (token, expert), row-major (JSON-friendly)."""
    return np.packbits(np.asarray(sets, dtype=bool).reshape(-1)).tobytes().hex()


def unpack_expert_sets(packed: str, n_tokens: int, n_experts: int) -> np.ndarray:
    """The (n_tokens, n_experts) bool array `pack_expert_sets` wrote; a ValueError when `packed` is not exactly
    that many bits (a truncated or foreign string is never padded into a routing)."""
    raw = bytes.fromhex(packed)
    if n_tokens < 0 or n_experts < 0 or len(raw) != -(-n_tokens * n_experts // 8):
        raise ValueError(f"{len(raw)} bytes of expert sets for {n_tokens} tokens x {n_experts} experts")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n_tokens * n_experts)
    return bits.astype(bool).reshape(n_tokens, n_experts)
