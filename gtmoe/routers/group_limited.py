"""Group-limited top-k routing: DeepSeek-V2 device-limited and DeepSeek-V3 node-limited routing.

The E experts form `n_groups` equal contiguous groups (the experts of one device, V2, or of one node,
V3). Each token first keeps its `top_groups` best groups, then takes its top k experts among theirs:

    s_t    = softmax(g_t + selection bias)                      (the token's affinities, over all E)
    score_m = max_{e in m} s_te                (group_score = max: DeepSeek-V2, arXiv 2405.04434 §2.2.2)
            = sum of the 2 largest s_te, e in m  (top2_sum: DeepSeek-V3, arXiv 2412.19437 §2.1.2)
    experts outside the top_groups best groups -> -inf;   choice = top-k of the rest

as DeepSeek-V3's inference code does (deepseek-ai/DeepSeek-V3 inference/model.py `Gate.forward`:
`n_groups`, `topk_groups`, `scores.topk(2, dim=-1)[0].sum(dim=-1)` with the bias, `amax` without). The
V3 paper states the group score as the sum of the K_r / M highest affinities of a node (8 / 4 = 2 in
V3), which Megatron-Core's `group_limited_topk` follows (topk // group_topk); the released code fixes 2.
A group smaller than 2 scores by its one expert. Everything else is the top-k family's: the combine
weights (softmax of g over the chosen), the balance loss, selection terms and capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.checks import check
from gtmoe.routers.base import softmax
from gtmoe.routers.registry import register
from gtmoe.routers.topk import TopKOptions, TopKRouter

GROUP_SCORES = ("top2_sum", "max")


@dataclass
class GroupLimitedOptions(TopKOptions):
    # 4 groups of the study's 8 experts, 2 kept: a token may reach half of the experts, so the limit binds
    # (with k = 2 a token could otherwise pick from any 2 of the 4 groups) without starving the choice.
    n_groups: int = 4
    top_groups: int = 2
    group_score: str = "top2_sum"  # top2_sum (DeepSeek-V3) | max (DeepSeek-V2)

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        check(self.n_groups >= 1, f"{prefix}.n_groups", self.n_groups, "must be >= 1")
        check(
            1 <= self.top_groups <= self.n_groups,
            f"{prefix}.top_groups",
            self.top_groups,
            f"must be between 1 and {prefix}.n_groups = {self.n_groups}",
        )
        check(
            self.group_score in GROUP_SCORES,
            f"{prefix}.group_score",
            self.group_score,
            f"must be one of {', '.join(GROUP_SCORES)}",
        )

    def validate_for_model(self, model_cfg, prefix: str = "router") -> None:
        super().validate_for_model(model_cfg, prefix)
        n_experts, top_k = model_cfg.n_experts, model_cfg.top_k
        check(
            n_experts % self.n_groups == 0,
            f"{prefix}.n_groups",
            self.n_groups,
            f"must divide model.n_experts = {n_experts} (the groups are equal)",
        )
        reachable = self.top_groups * (n_experts // self.n_groups)
        check(
            reachable >= top_k,
            f"{prefix}.top_groups",
            self.top_groups,
            f"keeps {reachable} experts ({self.top_groups} groups of {n_experts // self.n_groups}), "
            f"fewer than model.top_k = {top_k}",
        )


@register("group_limited")
class GroupLimitedRouter(TopKRouter):
    """Top-k within each token's `top_groups` best expert groups (DeepSeek-V2 / V3)."""

    Config = GroupLimitedOptions
    label = "group-limited top-k"

    @classmethod
    def build(cls, options: GroupLimitedOptions, model_cfg) -> GroupLimitedRouter:
        options.validate_for_model(model_cfg)  # also here: a model built without RunConfig.validate()
        return super().build(options, model_cfg)

    def group_scores(self, scores: Tensor) -> Tensor:
        """(T, n_groups): each group's score from the token's affinities softmax(scores)."""
        affinity = softmax(scores).view(scores.shape[0], self.options.n_groups, -1)
        if self.options.group_score == "max":
            return affinity.amax(dim=-1)
        return affinity.topk(min(2, affinity.shape[-1]), dim=-1).values.sum(dim=-1)

    def select(self, scores: Tensor) -> Tensor:
        groups = self.group_scores(scores).topk(self.options.top_groups, dim=-1).indices  # (T, top_groups)
        kept = torch.zeros(scores.shape[0], self.options.n_groups, dtype=torch.bool, device=scores.device)
        kept = kept.scatter(-1, groups, True).repeat_interleave(self.n_experts // self.options.n_groups, dim=-1)
        return scores.masked_fill(~kept, float("-inf")).topk(self.top_k, dim=-1).indices
