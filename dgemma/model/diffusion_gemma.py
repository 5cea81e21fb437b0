"""The DiffusionGemma text network: one stack of weights run two ways.

`encode` is the causal encoder: it reads new tokens, writes their keys/values into a `KVCache` and returns the
final hidden states. `decode` is the bidirectional decoder: it reads a canvas (plus optional self-conditioning
logits from the previous step) against the cache without writing it and returns soft-capped float32 logits.
Both share every weight (embedding, layers, final norm); only the decoder uses the self-conditioning block; the
head is the tied embedding. Encoder and decoder keep their own `layer_scalar` buffers, as checkpoints store both.
Must not: sample, pad prompts, or read files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..engine.cache import KVCache
from .layers import Attention, Experts, GatedMLP, RMSNorm, Router, rms_norm, rope_cos_sin, rope_inv_freq


class Layer(nn.Module):
    """Attention block, then a dense MLP and the MoE in parallel on the same residual, then the layer scalar."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_type = cfg.layer_types[index]
        self.self_attn = Attention(cfg, index)
        self.mlp = GatedMLP(h, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                     "pre_feedforward_layernorm_2"):
            setattr(self, name, RMSNorm(h, eps))

    def forward(self, x, cos, sin, mask, past_k, past_v, scalar):
        """x [B, T, H]; past_k/past_v [B, Hkv, S, D] or None; mask [B, 1, T, S + T].
        Returns (x [B, T, H], keys [B, Hkv, S + T, D], values [B, Hkv, S + T, D])."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), cos, sin)
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        x = self.post_attention_layernorm(self.self_attn.attend(q, k, v, mask), residual=x)

        residual = x
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(residual)))
        flat = residual.reshape(-1, residual.shape[-1])
        weights, index = self.router(flat)
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, index).reshape(residual.shape)
        moe = self.post_feedforward_layernorm_2(moe)
        x = self.post_feedforward_layernorm(dense + moe, residual=residual)
        return x * scalar, k, v


class SelfConditioning(GatedMLP):
    """signal = gated MLP(pre_norm(soft embeddings)); output = weightless_norm(embedded canvas + signal)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, cfg.intermediate_size)
        self.eps = cfg.rms_norm_eps
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embedded: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        # With no previous logits the soft embeddings are zeros, whose signal is exactly zero: skip the MLP.
        if soft is not None:
            embedded = embedded + super().forward(self.pre_norm(soft))
        return rms_norm(embedded, None, self.eps)


class DiffusionGemma(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        n = cfg.num_hidden_layers
        # Zeros, not nn.Embedding's own N(0, 1) draw: weights come from a checkpoint or `init_weights`, and on the
        # meta device (where every loader builds first) that draw imports torch._dynamo, 0.8 s of each load.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.zeros(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(n))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        self.register_buffer("encoder_layer_scalars", torch.ones(n))
        self.register_buffer("decoder_layer_scalars", torch.ones(n))
        # One inverse-frequency table per (layer type, head dim), built in float32 and never cast; a copy per device
        # it has run on, so a forward copies nothing from the host (CUDA graph capture forbids it).
        self._inv_freq = {
            (t, d): rope_inv_freq(cfg.rope[t], d) for t, d in zip(cfg.layer_types, cfg.layer_head_dims)
        }
        self._inv_freq_on: dict[torch.device, dict] = {}

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> DiffusionGemma:
        """Random initialisation: projections and experts ~ N(0, std), norms and scales 1, layer scalars 1."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        self.encoder_layer_scalars.fill_(1.0)
        self.decoder_layer_scalars.fill_(1.0)
        return self

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [B, T, H], scaled by sqrt(hidden) rounded through the weight dtype."""
        scale = torch.tensor(self.config.hidden_size**0.5).to(self.dtype)
        return self.embed_tokens(ids) * scale

    def head(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, H] -> float32 logits [B, T, V] through the tied embedding, soft-capped; written into `out`
        [B, T, V] float32 when given (the same numbers, without a new [B, T, V] allocation; no gradients)."""
        weight = self.embed_tokens.weight
        if out is None:
            logits = F.linear(hidden, weight).float()
        elif type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype == hidden.dtype == torch.float32:
            logits = torch.matmul(hidden, weight.t(), out=out)  # what F.linear runs for a 3-D input without bias
        else:
            logits = out.copy_(F.linear(hidden, weight))
        cap = self.config.final_logit_softcapping
        if not cap:
            return logits
        if out is None and torch.is_grad_enabled():
            return torch.tanh(logits / cap) * cap
        return logits.div_(cap).tanh_().mul_(cap)  # the same arithmetic in place: no [B, T, V] float32 temporaries

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        device = positions.device
        tables = self._inv_freq_on.get(device)
        if tables is None:
            tables = self._inv_freq_on[device] = {key: inv.to(device) for key, inv in self._inv_freq.items()}
        return {key: rope_cos_sin(positions, inv, dtype) for key, inv in tables.items()}

    def _run(self, x, positions, masks, cache: KVCache, scalars: torch.Tensor, write: bool) -> torch.Tensor:
        rotary = self._rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            cos, sin = rotary[(layer.layer_type, layer.self_attn.head_dim)]
            past_k, past_v = cache.cached(i)
            x, k, v = layer(x, cos, sin, masks[layer.layer_type], past_k, past_v, scalars[i])
            if write:
                cache.store(i, k, v)
        return self.norm(x)

    def encode(self, ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Causal pass over new tokens ids [B, T] in slots [cache.length, cache.length + T); appends their keys
        and values to `cache`. valid [B, T] marks real tokens (False = padding). Returns hidden [B, T, H]."""
        if valid is None:
            valid = torch.ones_like(ids, dtype=torch.bool)
        positions = cache.positions(ids.shape[1], ids.device)  # [T] or [B, T]
        masks = cache.encoder_masks(valid)
        hidden = self._run(self.embed(ids), positions, masks, cache, self.encoder_layer_scalars, write=True)
        cache.advance(valid)
        return hidden

    def decode(self, canvas: torch.Tensor, cache: KVCache, self_conditioning_logits: torch.Tensor | None = None,
               self_conditioning_mask: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
               probs: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional pass over canvas [B, C] placed right after the cached prefix; reads `cache` without
        writing it. self_conditioning_logits [B, C, V] are the previous step's processed logits (None on the
        first step); self_conditioning_mask [B] bool zeroes the signal of some rows (training). Returns float32
        soft-capped logits [B, C, V]. `out` (the logits) and `probs` (room for the self-conditioning softmax), both
        [B, C, V] float32, only save allocations: on a CPU a fresh [B, C, V] buffer costs a page fault per 4 KiB."""
        x = self.embed(canvas)
        soft = None
        if self_conditioning_logits is not None:
            probs = _softmax_float32(self_conditioning_logits, probs).to(self.dtype)
            scale = torch.tensor(self.config.hidden_size**0.5).to(self.dtype)
            soft = (probs @ self.embed_tokens.weight) * scale
            if self_conditioning_mask is not None:
                soft = soft * self_conditioning_mask.to(soft.dtype)[:, None, None]
        x = self.self_conditioning(x, soft)
        positions = cache.positions(canvas.shape[1], canvas.device)
        masks = cache.decoder_masks(canvas.shape[1])
        return self.head(self._run(x, positions, masks, cache, self.decoder_layer_scalars, write=False), out)


def _softmax_float32(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """torch.softmax(x, dim=-1, dtype=torch.float32), into `out` when given and x is float32 (the same kernel)."""
    if out is not None and x.dtype == torch.float32:
        return torch.ops.aten._softmax.out(x, -1, False, out=out)
    return torch.softmax(x, dim=-1, dtype=torch.float32)
