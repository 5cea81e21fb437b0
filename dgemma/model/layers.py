"""Building blocks of the DiffusionGemma layer: RMSNorm, rotary embeddings, attention, dense MLP, router, experts.

Owns the exact per-block math of the reference (float32 norms, scale-1 attention with q/k/v norms, keys as values
on full layers, proportional partial RoPE, tanh-GELU gated MLPs, softmax top-k router with per-expert scales).
Must not: know about caches, canvases, sampling or files. Attention takes ready key/value tensors and a mask.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SLIDING, ModelConfig, RopeConfig
from ..kernels import triton_available, triton_norm


# Whether norms on a GPU run as one Triton launch each (`kernels.triton_norm`; q and k with their rotation) where no
# gradient is needed.
FUSED_NORM = True


def _triton_inference(x: torch.Tensor) -> bool:
    """Whether Triton kernels may take `x`: a GPU with Triton, and no gradient needed (they have no backward)."""
    return x.is_cuda and not torch.is_grad_enabled() and triton_available(x)


def _fused(x: torch.Tensor) -> bool:
    return FUSED_NORM and _triton_inference(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """[residual +] x * (mean(x^2) + eps)^-0.5 [* weight], computed in float32, returned in x's dtype (the residual
    is added after that rounding, as `residual + rms_norm(x)` would)."""
    if _fused(x):
        return triton_norm.rms_norm(x, weight, eps, residual)
    xf = x.float()
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.float()
    out = out.type_as(x)
    return out if residual is None else residual + out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_weight else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (float32), as the reference computes them. "proportional" rotates only the
    first partial_factor share of the angles (exponents over the whole head_dim), leaves the rest unrotated and divides
    by `factor`; "default" rotates every angle and, like the reference, ignores `factor` (partial_factor must be 1: the
    reference fails on anything else)."""
    if rope.kind == "proportional":
        angles = int(rope.partial_factor * head_dim // 2)
        exps = torch.arange(0, 2 * angles, 2, dtype=torch.int64, device="cpu").float() / head_dim
        inv = torch.cat([1.0 / rope.theta**exps, torch.zeros(head_dim // 2 - angles, device="cpu")])
        return inv / rope.factor
    if rope.partial_factor != 1.0:
        raise ValueError("default rope with partial_rotary_factor != 1 is not supported")
    return 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions [T] or [B, T] (int) -> cos, sin [..., T, head_dim] in `dtype` (computed in float32)."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D], cos/sin [T, D] or [B, T, D] -> rotated x (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


def norm_rope(x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope(norm(x), cos, sin) for x [B, T, H, D]; one Triton launch where `rms_norm` fuses (D a power of two)."""
    if _fused(x) and x.shape[-1] & (x.shape[-1] - 1) == 0:
        return triton_norm.rms_norm(x, norm.weight, norm.eps, rope=(cos, sin))
    return apply_rope(norm(x), cos, sin)


def repeat_kv(q: torch.Tensor) -> bool:
    """Whether attention repeats key/value heads up to the query heads instead of passing enable_gqa: on CUDA, whose
    fused SDPA kernels take no GQA broadcast together with a mask, so enable_gqa would run the unfused math path."""
    return q.is_cuda


class Attention(nn.Module):
    """Grouped-query attention with q/k/v norms and scale 1. Full layers have no v_proj: values are the raw key
    projections. `project` makes this step's rotated q, k and normed v; `attend` mixes them with cached keys."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        self.head_dim = cfg.layer_head_dims[layer]
        self.kv_heads = cfg.layer_kv_heads[layer]
        self.eps = cfg.rms_norm_eps
        self.q_proj = nn.Linear(h, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False) if cfg.layer_types[layer] == SLIDING \
            else None
        self.o_proj = nn.Linear(heads * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, hidden] -> q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D]."""
        b, t, _ = x.shape
        q = norm_rope(self.q_proj(x).view(b, t, -1, self.head_dim), self.q_norm, cos, sin)
        k_raw = self.k_proj(x).view(b, t, -1, self.head_dim)
        v = self.v_proj(x).view(b, t, -1, self.head_dim) if self.v_proj is not None else k_raw
        k = norm_rope(k_raw, self.k_norm, cos, sin)
        v = rms_norm(v, None, self.eps)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, D], k/v [B, Hkv, S, D], mask [B, 1, T, S] (True = may attend) -> [B, T, hidden]."""
        if repeat_kv(q):  # query head h reads key/value head h // groups, as enable_gqa maps them
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=k.shape[1] != q.shape[1])
        b, _, t, _ = q.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class GatedMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Router(nn.Module):
    """Weightless RMSNorm -> * scale * hidden^-0.5 -> linear -> float32 softmax -> top-k -> renormalise ->
    * per_expert_scale."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.top_k = cfg.top_k_experts
        self.root = cfg.hidden_size**-0.5
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: torch.Tensor):
        """x [N, hidden] -> weights [N, k] (float32), expert ids [N, k]."""
        scores = self.proj(rms_norm(x, None, self.eps) * self.scale * self.root)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


# How Experts runs its matmuls: "triton" (one launch per projection over all experts, `kernels.triton_dequant`, on a
# GPU with Triton, without gradients), "grouped" (one torch._grouped_mm per projection, where this build and the
# shapes allow it), "loop" (one matmul per expert: the plain reference path), or "auto" (triton, else grouped, else
# loop). All give the same numbers up to the order of float32 sums. The environment's DGEMMA_EXPERTS sets it.
EXPERTS_IMPLS = ("auto", "triton", "grouped", "loop")
EXPERTS_IMPL = os.environ.get("DGEMMA_EXPERTS", "auto")


def _experts_impl() -> str:
    if EXPERTS_IMPL not in EXPERTS_IMPLS:
        raise ValueError(f"DGEMMA_EXPERTS={EXPERTS_IMPL!r}: choose one of {', '.join(EXPERTS_IMPLS)}")
    return EXPERTS_IMPL


def _grouped_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    if _experts_impl() not in ("auto", "grouped") or not hasattr(torch, "_grouped_mm"):
        return False
    # The kernel needs 16-byte aligned rows and a 32- or 16-bit float type; on GPUs it wants bfloat16.
    aligned = all(w.shape[-1] * w.element_size() % 16 == 0 and w.shape[-2] * w.element_size() % 16 == 0
                  for w in weights)
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if x.device.type == "cpu" else (torch.bfloat16,)
    return aligned and x.dtype in dtypes


def triton_ok(x: torch.Tensor) -> bool:
    """Whether experts on `x` run through the Triton kernels (`_triton_inference`), unless EXPERTS_IMPL says not."""
    return _experts_impl() in ("auto", "triton") and _triton_inference(x)


def triton_mlp(xs: torch.Tensor, counts: torch.Tensor, gate_up, down) -> torch.Tensor:
    """xs [P, H] grouped by expert with counts [E] -> [P, H] through one Triton launch per product; gate_up
    [E, 2I, H] and down [E, H, I] are float weights in xs's dtype or int8/int4 QTensors."""
    from ..kernels import triton_dequant  # here, not at the top: the kernels' module imports the quant package

    return gated_mlp(xs, lambda x: triton_dequant.grouped_linear(x, counts, gate_up),
                     lambda h: triton_dequant.grouped_linear(h, counts, down))


def gated_mlp(xs: torch.Tensor, gate_up, down) -> torch.Tensor:
    """The experts' gated MLP given its two products: gate_up(xs [P, H]) -> gate, up [P, I] each; returns
    down(gelu_tanh(gate) * up) [P, H]."""
    gate, up = gate_up(xs).chunk(2, dim=-1)
    return down(F.gelu(gate, approximate="tanh") * up)


class Experts(nn.Module):
    """E gated experts stored as gate_up_proj [E, 2I, H] and down_proj [E, H, I]. Token-expert pairs are sorted by
    (expert, top-k slot, token), the reference's order, so each expert multiplies all of its tokens at once: in one
    launch over every expert, or expert by expert (see EXPERTS_IMPL)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def _mlp(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [P, H] grouped by expert with counts [E] -> [P, H]."""
        if triton_ok(xs):
            return triton_mlp(xs, counts, self.gate_up_proj, self.down_proj)
        if _grouped_ok(xs, self.gate_up_proj, self.down_proj):
            offsets = counts.cumsum(0).to(torch.int32)
            return gated_mlp(xs, lambda x: torch._grouped_mm(x, self.gate_up_proj.transpose(1, 2), offs=offsets),
                             lambda h: torch._grouped_mm(h.contiguous(), self.down_proj.transpose(1, 2), offs=offsets))
        return self._expert_loop(xs, counts)

    def _product(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        """x [P, K] @ weight `name`[expert]^T -> [P, N]."""
        return F.linear(x, getattr(self, name)[expert])

    def _expert_loop(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`_mlp` expert by expert through `_product`."""
        outs, start = [], 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                outs.append(gated_mlp(xs[start:start + count], lambda x: self._product(x, "gate_up_proj", expert),
                                      lambda h: self._product(h, "down_proj", expert)))
                start += count
        return torch.cat(outs)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x [N, H], weights/index [N, k] -> [N, H]."""
        n, k = index.shape
        flat = index.reshape(-1)  # pair p = token * k + slot
        slot_major = torch.arange(n * k, device=x.device).view(n, k).t().reshape(-1)  # pairs by (slot, token)
        order = slot_major[torch.argsort(flat[slot_major], stable=True)]
        token = order // k  # [N*k] token of each sorted pair
        counts = torch.zeros(self.gate_up_proj.shape[0], dtype=torch.long, device=x.device)  # [E]
        counts.index_add_(0, flat, torch.ones_like(flat))  # bincount, without its device-to-host sync on GPUs
        ys = self._mlp(x[token], counts) * weights.reshape(-1)[order, None]
        out = torch.zeros_like(x)
        return out.index_add_(0, token, ys.to(x.dtype))
