"""Decoder-only Transformer LM whose FFN blocks are MoE layers (SPEC §2).

Pre-norm (RMSNorm), causal self-attention with rotary or learned positions,
tied input/output embeddings. Every `moe_every`-th block's FFN is built by the
configured router's registry entry (an MoE layer, with `n_shared_experts`
shared experts, or a dense SwiGLU); the other blocks' FFN is a SwiGLU of the
MoE layer's active size, (top_k + n_shared_experts) * d_expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gtmoe import routers
from gtmoe.config import ModelConfig, RouterConfig, RunConfig
from gtmoe.ffn import SwiGLU
from gtmoe.loss import IGNORE_INDEX, linear_cross_entropy
from gtmoe.moe import MoELayer


def rotary_table(seq_len: int, head_dim: int, base: float = 10000.0) -> Tensor:
    """(seq_len, head_dim / 2) complex unit rotations: position p turns pair i by p * base^(-2i / head_dim).

    On the meta device (gtmoe.config.parameter_count builds the model there to count it) an empty table of
    that shape: a meta tensor holds no values, and torch would compute these ops there through Python
    decompositions (a 1.5 s import of torch._dynamo on first use, then milliseconds per layer).
    """
    if torch.get_default_device().type == "meta":
        return torch.empty(seq_len, head_dim // 2, dtype=torch.complex64)
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate the adjacent pairs (x[..., 2i], x[..., 2i + 1]) of x (B, S, ..., D) by `rotation` (S, D / 2).

    One complex multiply (Llama's form) instead of the half-split form's slices, four products and a
    concatenation: a fifth of the attention block's time (forward and backward) at the study's size.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # complex32 has no bf16 form: rotate in fp32
    rotation = rotation[: x.shape[1]].view(x.shape[1], *([1] * (x.dim() - 3)), -1)
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.rotary = cfg.positional == "rope"
        if self.rotary:
            self.register_buffer(
                "rotation", rotary_table(cfg.max_seq_len, cfg.d_model // cfg.n_heads), persistent=False
            )

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, d_model = x.shape
        # split, not indexing: its gradient is one concatenation, where two slices' would be two zero-filled
        # copies of the whole projection added together.
        qk, v = self.qkv(x).view(batch, seq, 3, self.n_heads, d_model // self.n_heads).split([2, 1], dim=2)
        if self.rotary:  # queries and keys in one op
            qk = apply_rotary(qk, self.rotation)
        q, k = qk.unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.squeeze(2).transpose(1, 2),
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
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
    logits: Tensor | None  # (B, S, V); None when targets are given (the loss op never materialises them)
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
            m = model_cfg
            if (layer + 1) % m.moe_every != 0:
                return SwiGLU(m.d_model, (m.top_k + m.n_shared_experts) * m.d_expert)
            if not self.is_moe:
                return entry.build_ffn(options, m)
            return MoELayer(entry.build(options, m), m.d_model, m.d_expert, m.n_experts, m.n_shared_experts)

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
        for layer in self.moe_layers:
            layer.router.begin_batch(idx, targets)  # keeps the layout (padding, sequences), calls observe_batch
        for block in self.blocks:
            x = block(x, valid)
        hidden = self.norm(x)
        logits = loss = token_loss = None
        if targets is None:
            logits = self.lm_head(hidden)
        else:  # the LM head and the loss in one op: training never needs the (B, S, V) logits
            token_loss = linear_cross_entropy(
                hidden.view(-1, hidden.shape[-1]), self.lm_head.weight, targets.reshape(-1)
            )
            loss = token_loss.sum() / (targets != IGNORE_INDEX).sum().clamp_min(1)

        router_loss = hidden.new_zeros((), dtype=torch.float32)
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
        """(total, active per token): an MoE layer's token uses only its routed experts' weights (and all of its
        shared experts', which are outside `experts`), so the inactive ones are the routed experts it skips."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for layer in self.moe_layers:
            per_expert = sum(p[0].numel() for p in layer.experts.parameters())
            inactive += per_expert * (layer.n_experts - layer.router.active_experts_per_token())
        return total, int(round(total - inactive))


def build_model(cfg: RunConfig) -> MoETransformer:
    return MoETransformer(cfg.model, cfg.router)


class _SkipMetaInit(TorchFunctionMode):
    """Initialisers (torch.nn.init, Tensor.normal_ / uniform_) on meta tensors do nothing: none holds values.

    torch computes normal_ on the meta device through a Python decomposition: about 1 ms a call, after a
    1.5 s import of torch._dynamo on the first, which made counting a model's parameters cost seconds. A
    torch-function mode, not a dispatch mode: entering the dispatch-mode path imports torch._dynamo too.
    Every other call runs as it is, so parameters keep the shapes their constructors give them.
    """

    TENSOR_INITIALISERS = (torch.Tensor.normal_, torch.Tensor.uniform_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        initialiser = func in self.TENSOR_INITIALISERS or getattr(func, "__module__", None) == "torch.nn.init"
        if initialiser and isinstance(target, Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def shape_only_model(model_cfg: ModelConfig, router_cfg: RouterConfig) -> MoETransformer:
    """The model `MoETransformer(model_cfg, router_cfg)` on the meta device: every parameter and buffer with
    its shape and no storage, initialisers skipped. For counting parameters (gtmoe.config.parameter_count)
    without allocating them; a router must construct on the meta device (no tensor forced onto a device)."""
    with torch.device("meta"), _SkipMetaInit():
        return MoETransformer(model_cfg, router_cfg)
