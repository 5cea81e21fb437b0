"""Calibrated rounding (GPTQ) for the int8 and int4 formats.

Round-to-nearest rounds every weight on its own. GPTQ rounds the inputs of a weight one at a time and moves each
rounding error onto the inputs not yet rounded, in proportion to how those inputs co-vary on calibration text (the
Hessian H = sum of x x^T over the layer's inputs), so the layer's output on such text moves less. The result is an
ordinary `QTensor` in the layout `formats.quantize` makes; loading and kernels do not know the difference.

- `gptq(weight, hessian, kind, group_size)`: one weight [..., N, K] (experts: [E, N, K] with one Hessian per expert,
  [E, K, K]) -> QTensor. Group scales (and int4 offsets) come from the weights as updated when the group's first
  input is reached, by the same rule as `formats.quantize`.
- `calibration_windows`: token windows [W, T] cut from a tokenized text stream.
- `calibrate(net, windows, ...)`: every attention, dense, self-conditioning and expert weight of a float model ->
  its QTensor. It works one block (the self-conditioning MLP, then each layer) at a time: hooks gather that block's
  Hessians while the calibration passes run, the block's weights are rounded, and the Hessians are dropped, so only
  one layer's statistics are ever held. Each pass encodes a window's first half and denoises its second half as a
  canvas (uniform noise at a random rate per window), then again with that pass's logits as self-conditioning: the
  inputs the weights see when generating. The network stays float throughout; the embedding is not calibrated.
Must not: read or write files.
"""

from __future__ import annotations

import sys
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.cache import KVCache
from ..model.diffusion_gemma import DiffusionGemma
from ..model.layers import Experts
from .formats import QTensor, group_for, int4_rows, int8_rows, pack_int4, round_codes
from .modules import role, weight_kind

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: keeps H invertible where inputs are few or collinear
_BLOCK = 128  # inputs whose updates are applied lazily together (a multiple of the group size)


def _group_params(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [R, G] float32 -> scale [R] and (int4) offset [R], as `formats.quantize` picks them for one group."""
    if kind == "int4":
        _, scale, offset = int4_rows(x, x.shape[-1])
        return scale[:, 0], offset[:, 0]
    return int8_rows(x, x.shape[-1], torch.float32)[1][:, 0], None


def _round(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None):
    """x [R] -> (codes [R], dequantized [R]) with a group's scale and offset."""
    s, o = scale.to(x.dtype), None if offset is None else offset.to(x.dtype)
    codes = round_codes(x, s, o)
    return codes, codes * s if o is None else codes * s + o


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, kind: str, group_size: int | None) -> QTensor:
    """weight [..., N, K] and hessian [..., K, K] (sum of x x^T over the inputs x [K] the weight multiplied; one per
    leading index) -> QTensor of `kind` ("int8"/"int4") with `group_size` (None: one int8 scale per output channel).
    Works in float64 on the CPU, float32 elsewhere. An input never seen (zero on H's diagonal) is rounded to nearest."""
    if kind not in ("int8", "int4"):
        raise ValueError(f"can quantize to int8 or int4, not {kind!r}")
    if kind == "int4" and group_size is None:
        raise ValueError("int4 needs a group size (32, 64 or 128)")
    *lead, n, k = weight.shape
    if tuple(hessian.shape) != (*lead, k, k):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not fit weight {tuple(weight.shape)}")
    group = group_for(k, group_size)
    work = torch.float64 if weight.device.type == "cpu" else torch.float32
    w = weight.reshape(-1, n, k).to(work).clone()  # [E, N, K]
    h = hessian.reshape(-1, k, k).to(work).clone()  # [E, K, K]
    e = w.shape[0]
    diag = h.diagonal(dim1=-2, dim2=-1)  # a view: writes go into h
    dead = diag == 0
    diag.add_(DAMP * diag.mean(-1, keepdim=True)).masked_fill_(dead, 1.0)
    # Upper Cholesky factor of H^-1: row j holds how input j's error spreads over the inputs after it. An unseen
    # input has no cross terms, so its row and column hold only the diagonal: its error stays put and none reaches it.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # [E, K, K]
    codes = torch.empty(e, n, k, dtype=torch.int16, device=w.device)
    scales = torch.empty(e, n, k // group, dtype=torch.float16 if kind == "int4" else torch.float32, device=w.device)
    offsets = torch.empty_like(scales) if kind == "int4" else None
    # Columns go in blocks of about _BLOCK (later columns are updated once per block); a block never splits a group,
    # and a group of many blocks (one per row: int8 per channel) starts at a block's start.
    block = _BLOCK if group % _BLOCK == 0 or group == k else group * max(1, _BLOCK // group)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, :, b0:b1]  # [E, N, B] view, updated in place
        errors = torch.empty_like(wb)
        for j in range(b1 - b0):
            col, g = b0 + j, (b0 + j) // group
            if col % group == 0:
                s, o = _group_params(w[:, :, col:col + group].reshape(e * n, group).float(), kind)
                scales[:, :, g] = s.view(e, n)
                if offsets is not None:
                    offsets[:, :, g] = o.view(e, n)
            c, q = _round(wb[:, :, j], scales[:, :, g], None if offsets is None else offsets[:, :, g])
            codes[:, :, col] = c
            err = (wb[:, :, j] - q) / u[:, col, col][:, None]  # [E, N]
            wb[:, :, j:] -= err[:, :, None] * u[:, None, col, b0 + j:b1]
            errors[:, :, j] = err
        w[:, :, b1:] -= errors @ u[:, b0:b1, b1:]
    shape = (*lead, n)
    if kind == "int8":
        return QTensor("int8", codes.to(torch.int8).view(*shape, k), scales.view(*shape, k // group))
    packed = pack_int4(codes.to(torch.uint8), group)
    return QTensor("int4", packed.view(*shape, k // 2), scales.view(*shape, k // group),
                   offsets.view(*shape, k // group))


def calibration_windows(docs: Iterable[list[int]], count: int, length: int) -> torch.Tensor:
    """Token id lists (one per document) -> `count` windows [count, length] cut one after another from the documents
    joined end to end, in the order given; documents are read only until the windows are full."""
    if count <= 0 or length <= 1:
        raise ValueError(f"need a positive window count and a length above 1, got {count} x {length}")
    stream: list[int] = []
    for doc in docs:
        stream.extend(doc)
        if len(stream) >= count * length:
            break
    if len(stream) < count * length:
        raise ValueError(f"the calibration text holds {len(stream)} tokens; {count} windows of {length} need "
                         f"{count * length} (give more text or fewer windows)")
    return torch.tensor(stream[:count * length]).view(count, length)


class _Hessians:
    """Hooks that add x x^T of the inputs of a block's quantizable linears and experts while passes run."""

    def __init__(self, block: nn.Module, prefix: str):
        self.sums: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, module in block.named_modules():
            target = f"{prefix}.{name}" if name else prefix
            if isinstance(module, nn.Linear) and role(target + ".weight") == "linear":
                self.handles.append(module.register_forward_pre_hook(self._linear(target + ".weight")))
            elif isinstance(module, Experts):
                self.handles.append(module.register_forward_pre_hook(self._experts(target)))

    def _add(self, target: str, index, x: torch.Tensor) -> None:
        x = x.float()
        k = x.shape[-1]
        if target not in self.sums:
            shape = (k, k) if index is None else (index[1], k, k)
            self.sums[target] = torch.zeros(shape, dtype=torch.float32, device=x.device)
        (self.sums[target] if index is None else self.sums[target][index[0]]).addmm_(x.T, x)

    def _linear(self, target: str):
        def hook(module, args):
            x = args[0]
            self._add(target, None, x.reshape(-1, x.shape[-1]))
        return hook

    def _experts(self, target: str):
        def hook(module: Experts, args):
            x, _, index = args  # x [T, H], index [T, k]
            experts = module.gate_up_proj.shape[0]
            for expert in range(experts):
                xs = x[(index == expert).any(-1)]
                if xs.shape[0] == 0:
                    continue
                self._add(target + ".gate_up_proj", (expert, experts), xs)
                gate, up = F.linear(xs, module.gate_up_proj[expert]).chunk(2, dim=-1)
                self._add(target + ".down_proj", (expert, experts), F.gelu(gate, approximate="tanh") * up)
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def _passes(net: DiffusionGemma, windows: torch.Tensor, batch: int, seed: int) -> None:
    """The calibration passes: encode each window's first half, denoise its second half (noised) twice."""
    gen = torch.Generator().manual_seed(seed)
    vocab, device = net.config.vocab_size, net.device
    half = windows.shape[1] // 2
    for rows in windows.split(batch):
        b, c = rows.shape[0], rows.shape[1] - half
        cache = KVCache(net.config, b, device)
        net.encode(rows[:, :half].to(device), cache)
        rate = torch.rand(b, 1, generator=gen)
        noise = torch.randint(0, vocab, (b, c), generator=gen)
        canvas = torch.where(torch.rand(b, c, generator=gen) < rate, noise, rows[:, half:]).to(device)
        logits = net.decode(canvas, cache)
        net.decode(canvas, cache, logits)


def calibrate(net: DiffusionGemma, windows: torch.Tensor, kind: str, group_size: int | None = None,
              dense: str | None = None, batch: int = 8, seed: int = 0, progress: bool = False) -> dict[str, QTensor]:
    """GPTQ-rounded QTensors of every attention, dense, self-conditioning and expert weight of the float `net`, in the
    formats `quantize_model(net, kind, group_size, dense=dense)` gives them, keyed by parameter name. windows [W, T]:
    calibration token ids (T at least 2; the canvas half may be any length the model takes)."""
    from tqdm import tqdm

    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"calibration windows must be [count, length >= 2], got {tuple(windows.shape)}")
    blocks = [("self_conditioning", net.self_conditioning)] + [(f"layers.{i}", l) for i, l in enumerate(net.layers)]
    out: dict[str, QTensor] = {}
    for prefix, block in tqdm(blocks, desc="calibrate", disable=not progress, file=sys.stderr):
        hessians = _Hessians(block, prefix)
        try:
            _passes(net, windows, batch, seed)
        finally:
            hessians.close()
        for target, h in hessians.sums.items():
            wanted = weight_kind(role(target), kind, dense, None)
            module = net.get_submodule(target.rsplit(".", 1)[0])
            weight = getattr(module, target.rsplit(".", 1)[1])
            try:
                out[target] = gptq(weight, h, wanted, group_size)
            except torch.linalg.LinAlgError as err:
                raise ValueError(f"the calibration statistics of {target} cannot be inverted ({err}); calibrate on "
                                 "more text") from None
        del hessians
    return out
