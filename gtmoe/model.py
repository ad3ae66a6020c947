"""Decoder-only Transformer LM whose FFN blocks are MoE layers (SPEC §2).

Pre-norm (RMSNorm), causal self-attention with rotary or learned positions,
tied input/output embeddings. Every `moe_every`-th block's FFN is built by the
configured router's registry entry (an MoE layer, or the dense SwiGLU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gtmoe import routers
from gtmoe.config import ModelConfig, RouterConfig, RunConfig
from gtmoe.ffn import SwiGLU
from gtmoe.moe import MoELayer

IGNORE_INDEX = -100


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of a (B, H, S, D) tensor by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.rotary = cfg.positional == "rope"
        if self.rotary:
            cos, sin = rotary_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, d_model // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.rotary:
            q, k = apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, d_model))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x)))
        return x + self.drop(self.ffn(self.ffn_norm(x), valid))


@dataclass
class LMOutput:
    logits: Tensor  # (B, S, V)
    loss: Tensor | None  # mean token cross-entropy over non-ignored targets
    token_loss: Tensor | None  # (B*S,) per-token cross-entropy (0 at ignored targets)
    router_loss: Tensor  # sum over MoE layers of the routers' weighted auxiliary losses
    router_metrics: dict[str, Tensor]  # unweighted auxiliary terms and flip rates, mean over MoE layers


class MoETransformer(nn.Module):
    def __init__(self, model_cfg: ModelConfig, router_cfg: RouterConfig):
        super().__init__()
        self.cfg = model_cfg
        entry = routers.get(router_cfg.name)
        options = router_cfg.resolve()
        self.is_moe = issubclass(entry, routers.Router)

        def ffn(layer: int) -> nn.Module:
            if (layer + 1) % model_cfg.moe_every != 0:
                return SwiGLU(model_cfg.d_model, model_cfg.top_k * model_cfg.d_expert)
            if not self.is_moe:
                return entry.build_ffn(options, model_cfg)
            m = model_cfg
            return MoELayer(entry(options, m.d_model, m.n_experts, m.top_k), m.d_model, m.d_expert, m.n_experts)

        self.tok_emb = nn.Embedding(model_cfg.vocab_size, model_cfg.d_model)
        self.pos_emb = (
            nn.Embedding(model_cfg.max_seq_len, model_cfg.d_model) if model_cfg.positional == "learned" else None
        )
        self.drop = nn.Dropout(model_cfg.dropout)
        self.blocks = nn.ModuleList(Block(model_cfg, ffn(i)) for i in range(model_cfg.n_layers))
        self.norm = nn.RMSNorm(model_cfg.d_model)
        self.lm_head = nn.Linear(model_cfg.d_model, model_cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied embeddings
        self.apply(self._init_weights)
        # GPT-2: scale the residual-stream output projections by 1/sqrt(2 * n_layers).
        residual_std = 0.02 / math.sqrt(2 * model_cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(("proj.weight", "w2.weight", "experts.w2")):
                nn.init.normal_(param, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoELayer)]

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> LMOutput:
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        x = self.drop(x)
        # Positions without a target are the padding of a split's last block: no routing capacity for them.
        valid = None if targets is None else targets != IGNORE_INDEX
        for block in self.blocks:
            x = block(x, valid)
        logits = self.lm_head(self.norm(x))

        loss = token_loss = None
        if targets is not None:
            token_loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
            n_valid = (targets != IGNORE_INDEX).sum().clamp_min(1)
            loss = token_loss.sum() / n_valid

        router_loss = logits.new_zeros((), dtype=torch.float32)
        metrics: dict[str, list[Tensor]] = {}
        for layer in self.moe_layers:
            routing = layer.last_routing
            router_loss = router_loss + routing.loss
            for key, value in routing.metrics.items():
                metrics.setdefault(key, []).append(value)
        router_metrics = {key: torch.stack(values).mean() for key, values in metrics.items()}
        return LMOutput(logits, loss, token_loss, router_loss, router_metrics)

    @torch.no_grad()
    def observe_token_loss(self, token_loss: Tensor) -> None:
        """Hand the micro-batch's detached per-token loss to every router (RD-ESI's reputation signal)."""
        for layer in self.moe_layers:
            layer.router.observe_token_loss(token_loss.detach())

    @torch.no_grad()
    def update_router_states(self) -> None:
        """Once per optimizer step: stateful routers fold in the step's statistics."""
        for layer in self.moe_layers:
            layer.router.update_state()

    @torch.no_grad()
    def reset_router_step_statistics(self) -> None:
        """A skipped optimizer step: the routers forget the statistics gathered for it."""
        for layer in self.moe_layers:
            layer.router.reset_step_statistics()

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token): an MoE layer's token uses only its routed experts' weights."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for layer in self.moe_layers:
            per_expert = sum(p[0].numel() for p in layer.experts.parameters())
            inactive += per_expert * (layer.n_experts - layer.router.active_experts_per_token())
        return total, int(round(total - inactive))


def build_model(cfg: RunConfig) -> MoETransformer:
    return MoETransformer(cfg.model, cfg.router)
