"""The block-diffusion training objective.

Owns the loss of one batch: the clean text before each supervised block goes through the causal encoder (whose
keys/values the decoder reads); each block is corrupted with uniform noise at a rate t ~ U(eps, 1) per example; the
decoder's cross-entropy on the clean block tokens (flat mean, optionally weighted by 1/(1 - t)); plus the encoder's
causal next-token loss on the clean sequence; two-pass self-conditioning with some probability (the first pass
without gradients); optionally a MoE load-balancing loss. Optionally (`span`) some blocks are corrupted as one
contiguous span instead, the shape of an infill hole between clean text, and (`lines`) some of those spans are one
whole line of the text, the shape of a single-line hole. Several consecutive blocks per sequence are supported.
Must not: own data loading, optimisers or distribution; every random draw comes from the generators handed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.cache import KVCache
from ..model.diffusion_gemma import DiffusionGemma


@dataclass(frozen=True)
class ObjectiveOptions:
    ar_weight: float = 1.0  # weight of the encoder's next-token loss
    self_conditioning: float = 0.5  # probability of the two-pass self-conditioned decoder step, per example
    eps: float = 1e-3  # t ~ U(eps, 1)
    reweight: bool = False  # weight each example's block loss by 1/(1 - t), capped at max_weight
    max_weight: float = 10.0
    balance_weight: float = 0.0  # MoE load-balancing loss weight (0 = off)
    span: float = 0.0  # probability, per example and block, of span corruption instead of uniform noise (0 = off)
    lines: float = 0.0  # probability that a span row's span is one whole line, where its block holds a line start

    def __post_init__(self):
        for name in ("self_conditioning", "span", "lines"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"objective.{name} is a probability in [0, 1], got {value!r}")
        if self.lines > 0 and self.span == 0:
            raise ValueError("objective.lines chooses among span rows: set objective.span above 0 too")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"objective.eps must be in (0, 1), got {self.eps!r}")


@dataclass
class Batch:
    """ids [B, T] = prefix [B, T - n*C] then n blocks of C tokens; supervise [B, T] marks tokens whose prediction
    is trained (False on padding and, in chat data, on non-assistant text); valid [B, T] False on padding."""

    ids: torch.Tensor
    supervise: torch.Tensor
    valid: torch.Tensor
    blocks: int

    def to(self, device: torch.device) -> Batch:
        return Batch(self.ids.to(device), self.supervise.to(device), self.valid.to(device), self.blocks)


def corrupt(block: torch.Tensor, t: torch.Tensor, vocab: int, rows: list[torch.Generator],
            span: float = 0.0, lines: float = 0.0,
            line_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt block [B, C]: each token is replaced by a uniform random id with probability t [B]; row i draws from
    rows[i]. With probability `span` a row instead has one contiguous run replaced (length uniform in 1..C, start
    uniform where it fits) and the rest kept clean. With probability `lines`, a span row whose block holds a token
    that begins a line (line_start [vocab] bool: ids whose text starts with a newline) has one whole line replaced
    instead: from such a token (chosen uniformly) up to the next one or the block's end, the shape of a single-line
    hole (newline, indentation and line). Returns (noisy block [B, C], each row's noised fraction [B]: t for
    uniform rows, run length / C for span rows). Without `lines` the draws are those made before the option."""
    c = block.shape[1]
    position = torch.arange(c)
    starts = line_start.to(block.device)[block].cpu() if lines > 0 else None  # [B, C] bool
    flips, rates = [], []
    for i, (g, rate) in enumerate(zip(rows, t.tolist())):
        if span > 0 and torch.rand(1, generator=g).item() < span:
            if lines > 0 and torch.rand(1, generator=g).item() < lines and bool(starts[i].any()):
                where = starts[i].nonzero().flatten()
                k = int(torch.randint(0, len(where), (1,), generator=g))
                start = int(where[k])
                end = int(where[k + 1]) if k + 1 < len(where) else c
            else:
                length = int(torch.randint(1, c + 1, (1,), generator=g))
                start = int(torch.randint(0, c - length + 1, (1,), generator=g))
                end = start + length
            flips.append((position >= start) & (position < end))
            rates.append((end - start) / c)
        else:
            flips.append(torch.rand(c, generator=g) < rate)
            rates.append(rate)
    flip = torch.stack(flips).to(block.device)
    noise = torch.stack([torch.randint(0, vocab, (c,), generator=g) for g in rows]).to(block.device)
    return torch.where(flip, noise, block), torch.tensor(rates, dtype=t.dtype, device=t.device)


def _uniform(rows: list[torch.Generator], device) -> torch.Tensor:
    """One U(0, 1) draw per row [B]."""
    return torch.cat([torch.rand(1, generator=g) for g in rows]).to(device)


class _RouterRecorder:
    """Collects router logits of every MoE call with gradients while active (for the load-balancing loss)."""

    def __init__(self, net: DiffusionGemma):
        self.device = net.device
        self.logits: list[torch.Tensor] = []
        self.handles = [layer.router.proj.register_forward_hook(self._hook) for layer in net.layers]

    def _hook(self, module, inputs, output):
        if torch.is_grad_enabled():  # the no-grad self-conditioning pass trains nothing and is left out
            self.logits.append(output)

    def balance_loss(self, top_k: int) -> torch.Tensor:
        """Mean over calls of E * sum_e (share of top-k slots routed to e) * (mean router probability of e); 0 when
        nothing was recorded (a pass without gradients, e.g. the held-out loss)."""
        if not self.logits:
            return torch.zeros((), device=self.device)
        losses = []
        for logits in self.logits:
            probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
            chosen = torch.topk(probs, top_k, dim=-1).indices
            share = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0) / top_k
            losses.append(probs.shape[-1] * (share * probs.mean(0)).sum())
        return torch.stack(losses).mean()

    def close(self):
        for h in self.handles:
            h.remove()


def losses(net: DiffusionGemma, batch: Batch, opts: ObjectiveOptions, rows: list[torch.Generator],
           normaliser: dict[str, float] | None = None, balance_scale: float = 1.0,
           uniform_passes: bool = False, line_start: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss terms for one batch. Returns {"loss", "diffusion", "ar", "self_conditioned"[, "balance"]}; "loss" is the
    weighted sum; "self_conditioned" counts the (row, block) pairs whose decoder pass read self-conditioning.
    rows[i] is row i's own random stream (noise rate, corruption, self-conditioning coin), so a row trains the
    same whichever batch or process it lands in.
    Token losses are sums divided by `normaliser` counts ({"diffusion": n, "ar": n}) when given (so micro-batches
    and data-parallel ranks share one global mean), else by this batch's own counts; the balance term (a mean per
    batch) enters "loss" times `balance_scale` (1 / number of micro-batches summed).
    `uniform_passes` runs the first self-conditioning pass even when no row of this batch uses it (its signal is then
    zeroed, which changes no number), so that every process makes the same calls (sharded training).
    `line_start` [vocab] bool marks the ids that begin a line; `opts.lines` needs it (see `corrupt`)."""
    if opts.lines > 0 and line_start is None:
        raise ValueError("objective.lines needs the ids that begin a line (line_start)")
    cfg = net.config
    c, b = cfg.canvas_length, batch.ids.shape[0]
    t_len = batch.ids.shape[1]
    prefix = t_len - batch.blocks * c
    if prefix < 0:
        raise ValueError(f"sequence of {t_len} tokens is shorter than {batch.blocks} blocks of {c}")
    recorder = _RouterRecorder(net) if opts.balance_weight > 0 else None
    try:
        # Encoder over the clean sequence, segment by segment, keeping the cache each block must see.
        cache = KVCache(cfg, b, batch.ids.device)
        hidden, caches = [], []
        bounds = [0, prefix] + [prefix + (i + 1) * c for i in range(batch.blocks)]
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                hidden.append(net.encode(batch.ids[:, start:end], cache, batch.valid[:, start:end]))
            caches.append(cache.snapshot())
        hidden = torch.cat(hidden, dim=1)  # [B, T, H]

        # Encoder next-token loss: position i predicts token i + 1 where that token is supervised.
        ar_logits = net.head(hidden[:, :-1])
        ar_target_mask = batch.supervise[:, 1:] & batch.valid[:, :-1]
        ar_tok = F.cross_entropy(ar_logits.flatten(0, 1), batch.ids[:, 1:].flatten(), reduction="none")
        ar_sum = (ar_tok * ar_target_mask.flatten()).sum()

        # Decoder: one corrupted block at a time against the cache of everything before it.
        diff_sum = torch.zeros((), device=batch.ids.device)
        diff_count = torch.zeros((), device=batch.ids.device)
        sc_count = torch.zeros((), device=batch.ids.device)
        for j in range(batch.blocks):
            lo, hi = prefix + j * c, prefix + (j + 1) * c
            clean, mask = batch.ids[:, lo:hi], batch.supervise[:, lo:hi]
            t = opts.eps + (1 - opts.eps) * _uniform(rows, clean.device)
            noisy, t = corrupt(clean, t, cfg.vocab_size, rows, opts.span, opts.lines, line_start)
            use_sc = _uniform(rows, clean.device) < opts.self_conditioning
            sc_count = sc_count + use_sc.sum()
            sc_logits = None
            if bool(use_sc.any()) or (uniform_passes and opts.self_conditioning > 0):
                with torch.no_grad():
                    sc_logits = net.decode(noisy, caches[j])
            logits = net.decode(noisy, caches[j], sc_logits, use_sc if sc_logits is not None else None)
            tok = F.cross_entropy(logits.flatten(0, 1), clean.flatten(), reduction="none").view(b, c)
            weight = mask.float()
            if opts.reweight:
                weight = weight * (1 / (1 - t)).clamp(max=opts.max_weight)[:, None]
            diff_sum = diff_sum + (tok * weight).sum()
            diff_count = diff_count + mask.sum()
        norm = normaliser or {"diffusion": float(diff_count), "ar": float(ar_target_mask.sum())}
        out = {
            "diffusion": diff_sum / max(norm["diffusion"], 1.0),
            "ar": ar_sum / max(norm["ar"], 1.0),
            "self_conditioned": sc_count,
        }
        out["loss"] = out["diffusion"] + opts.ar_weight * out["ar"]
        if recorder is not None:
            out["balance"] = recorder.balance_loss(cfg.top_k_experts)
            out["loss"] = out["loss"] + opts.balance_weight * balance_scale * out["balance"]
        return out
    finally:
        if recorder is not None:
            recorder.close()


def token_counts(batch: Batch, canvas_length: int) -> dict[str, float]:
    """Supervised token counts of a batch, as `losses` divides by them."""
    prefix = batch.ids.shape[1] - batch.blocks * canvas_length
    return {
        "diffusion": float(batch.supervise[:, prefix:].sum()),
        "ar": float((batch.supervise[:, 1:] & batch.valid[:, :-1]).sum()),
    }
