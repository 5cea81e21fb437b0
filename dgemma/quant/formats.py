"""Weight-only quantized formats: how a quantized weight is laid out, made, decoded and sized.

A weight W [..., N, K] (N output channels, K inputs; a leading dimension is the expert index) becomes a `QTensor`:

    kind   codes                          value of input k in row n                scale / offset [..., N, K // G]
    int8   int8 [..., N, K]               code * scale[n, k // G] (+ offset[...])  scale float32 (or float16)
    int4   uint8 [..., N, K // 2]         code * scale[n, k // G] + offset[...]    scale, offset float16; code 0..15
    fp8    float8_e4m3fn [..., N, K]      code * scale[n, k // G]                  scale float32 (imported checkpoints)

G is the group size: G = K means one scale per output channel (int8's default); int4 uses groups of 32/64/128
(16 for GGUF's Q2_K / Q3_K blocks).
An int8 offset is optional: `quantize` never makes one; GGUF's Q5_1 and Q5_K blocks (5-bit codes with a minimum)
repack into int8 groups of 32 with float16 scales and offsets.
int4 packing: within each group of G inputs, byte j holds input j in its low nibble and input j + G/2 in its high
nibble. For G = 32 that is byte for byte llama.cpp's Q4_0/Q4_1 block layout, so those blocks repack without arithmetic.
A requested group size that does not divide a row's K falls back to the largest even divisor of K below it
(704 inputs with group 128 use groups of 88), so every shape of the released model quantizes.

Owns: `QTensor`, `quantize`, `dequantize`, the rounding rule (`round_codes`), int4 pack/unpack and byte counts from
shapes alone.
Must not: know module or checkpoint tensor names, devices beyond the tensors handed in, or files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("int8", "int4", "fp8")
INT4_GROUP_SIZES = (32, 64, 128)
_CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}
# Rows processed at once while quantizing, so a 2 GB expert tensor never has several float32 copies alive.
_CHUNK_ELEMENTS = 1 << 22
# Clipping ratios tried per int4 group; the one with the smallest squared error wins.
_INT4_CLIP = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@dataclass(frozen=True)
class QTensor:
    """A quantized weight: codes, per-group scales and offsets (int4 always, int8 optionally); see the module
    docstring for the layout."""

    kind: str
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown quantized kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.codes.dtype != _CODE_DTYPES[self.kind]:
            raise ValueError(f"{self.kind} codes must be {_CODE_DTYPES[self.kind]}, got {self.codes.dtype}")
        if self.codes.dim() < 2:
            raise ValueError(f"quantized weight needs at least 2 dimensions, got shape {tuple(self.codes.shape)}")
        lead = tuple(self.codes.shape[:-1])
        if tuple(self.scale.shape[:-1]) != lead or self.scale.shape[-1] == 0 or self.in_features % self.scale.shape[-1]:
            raise ValueError(f"scale shape {tuple(self.scale.shape)} does not fit codes {tuple(self.codes.shape)}")
        if self.offset is None and self.kind == "int4":
            raise ValueError("int4 weights need an offset")
        if self.offset is not None and self.kind == "fp8":
            raise ValueError("fp8 weights have no offset")
        if self.offset is not None and self.offset.shape != self.scale.shape:
            raise ValueError(f"offset shape {tuple(self.offset.shape)} differs from scale {tuple(self.scale.shape)}")
        if self.kind == "int4" and self.group_size % 2:
            raise ValueError(f"int4 group size must be even, got {self.group_size}")

    @property
    def in_features(self) -> int:
        return self.codes.shape[-1] * (2 if self.kind == "int4" else 1)

    @property
    def shape(self) -> torch.Size:
        """The logical (dequantized) shape [..., N, K]."""
        return torch.Size((*self.codes.shape[:-1], self.in_features))

    @property
    def group_size(self) -> int:
        return self.in_features // self.scale.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, self.scale) if self.offset is None else (self.codes, self.scale, self.offset)

    def map(self, fn) -> QTensor:
        """The same weight with `fn` applied to codes, scale and offset (indexing, slicing rows, moving devices)."""
        return QTensor(self.kind, fn(self.codes), fn(self.scale), None if self.offset is None else fn(self.offset))

    def rows(self, start: int, stop: int) -> QTensor:
        """Output channels [start, stop) of a 2-D weight (itself when that is all of them: no new views to check)."""
        if start == 0 and stop >= self.codes.shape[0]:
            return self
        return self.map(lambda t: t[start:stop])


def group_for(in_features: int, requested: int | None) -> int:
    """The group size used for rows of `in_features` inputs: `requested` (None = the whole row) when it divides the
    row, else the largest even divisor of the row below it."""
    if requested is None or requested >= in_features:
        group = in_features
    else:
        group = next((g for g in range(requested, 1, -1) if in_features % g == 0 and g % 2 == 0), 0)
    if group == 0 or group % 2:
        raise ValueError(f"cannot group {in_features} inputs (group size {requested}): rows need an even length")
    return group


def round_codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """The nearest codes of x for a scale (and int4 offset) broadcast against it, in x's float dtype: int8 (no
    offset) -127..127 of x / scale, int4 0..15 of (x - offset) / scale."""
    if offset is None:
        return torch.round(x / scale).clamp_(-127, 127)
    return torch.round((x - offset) / scale).clamp_(0, 15)


def int8_rows(x: torch.Tensor, group: int, scale_dtype: torch.dtype):
    """x [R, K] float32 -> codes int8 [R, K], scale [R, K // group]."""
    r, k = x.shape
    xg = x.view(r, k // group, group)
    scale = (xg.abs().amax(-1) / 127).to(scale_dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = round_codes(xg, scale.float()[..., None]).to(torch.int8)
    return codes.view(r, k), scale


def int4_rows(x: torch.Tensor, group: int):
    """x [R, K] float32 -> codes uint8 [R, K] (0..15, unpacked), scale and offset float16 [R, K // group].
    Asymmetric min/max per group; the clipping ratio with the smallest squared error is kept per group."""
    r, k = x.shape
    xg = x.view(r, k // group, group)
    lo, hi = xg.amin(-1), xg.amax(-1)
    best_err = best_scale = best_offset = None
    for clip in _INT4_CLIP:
        scale = ((hi - lo) * clip / 15).clamp_min(2.0**-24).half()
        offset = (lo * clip).half()
        s, o = scale.float()[..., None], offset.float()[..., None]
        codes = round_codes(xg, s, o)
        err = (codes * s + o - xg).square_().sum(-1)
        if best_err is None:
            best_err, best_scale, best_offset = err, scale, offset
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_offset = torch.where(better, offset, best_offset)
    s, o = best_scale.float()[..., None], best_offset.float()[..., None]
    codes = round_codes(xg, s, o).to(torch.uint8)
    return codes.view(r, k), best_scale, best_offset


def pack_int4(codes: torch.Tensor, group: int) -> torch.Tensor:
    """codes uint8 [..., K] (0..15) -> packed uint8 [..., K // 2] in the half-group nibble layout."""
    g = codes.view(*codes.shape[:-1], codes.shape[-1] // group, group)
    half = group // 2
    packed = g[..., :half] | (g[..., half:] << 4)
    return packed.reshape(*codes.shape[:-1], codes.shape[-1] // 2)


def unpack_int4(packed: torch.Tensor, group: int) -> torch.Tensor:
    """packed uint8 [..., K // 2] -> codes uint8 [..., K] (0..15)."""
    k = packed.shape[-1] * 2
    g = packed.view(*packed.shape[:-1], k // group, group // 2)
    return torch.cat([g & 15, g >> 4], dim=-1).view(*packed.shape[:-1], k)


def quantize(weight: torch.Tensor, kind: str, group_size: int | None = None) -> QTensor:
    """weight [..., N, K] (any float dtype) -> QTensor. int8 with group_size None is per output channel; int4 needs
    a group size. Works through the rows in chunks, so the float32 working copies stay small."""
    if kind not in ("int8", "int4"):
        raise ValueError(f"can quantize to int8 or int4, not {kind!r}")
    if weight.dim() < 2 or not weight.is_floating_point():
        raise ValueError(f"quantize needs a floating weight with at least 2 dimensions, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if kind == "int4" and group_size is None:
        raise ValueError("int4 needs a group size (32, 64 or 128)")
    k = weight.shape[-1]
    group = group_for(k, group_size)
    rows = weight.reshape(-1, k)
    step = max(1, _CHUNK_ELEMENTS // k)
    codes, scales, offsets = [], [], []
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].float()
        if kind == "int8":
            c, s = int8_rows(chunk, group, torch.float32)
        else:
            c, s, o = int4_rows(chunk, group)
            c = pack_int4(c, group)
            offsets.append(o)
        codes.append(c)
        scales.append(s)
    lead = weight.shape[:-1]
    codes_t = torch.cat(codes).view(*lead, -1)
    scale_t = torch.cat(scales).view(*lead, k // group)
    offset_t = torch.cat(offsets).view(*lead, k // group) if offsets else None
    return QTensor(kind, codes_t, scale_t, offset_t)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """QTensor -> float weight [..., N, K] in `dtype` (computed in float32). `out` (contiguous float32 [..., N, K])
    takes the float32 values instead of a new tensor, so a caller may reuse one buffer tile after tile."""
    lead, k, groups = q.codes.shape[:-1], q.in_features, q.scale.shape[-1]
    if out is None:
        out = torch.empty(*lead, k, dtype=torch.float32, device=q.codes.device)
    grouped = out.view(*lead, groups, k // groups)
    # Codes are cast to float32 first and then scaled in place: a product mixing integer and float operands takes
    # PyTorch's unvectorized casting loop on the CPU (about ten times as long); the values are the same.
    if q.kind == "int4":  # each group's bytes: low nibbles are its first half, high nibbles its second
        packed = q.codes.view(*lead, groups, k // groups // 2)
        halves = grouped.view(*lead, groups, 2, k // groups // 2)
        halves[..., 0, :].copy_(packed & 15)
        halves[..., 1, :].copy_(packed >> 4)
    else:
        grouped.copy_(q.codes.view(*lead, groups, k // groups))
    grouped *= q.scale.float()[..., None]  # [..., N, groups, 1]
    if q.offset is not None:
        grouped += q.offset.float()[..., None]
    return out.to(dtype)


def quantized_nbytes(shape: tuple[int, ...], kind: str, group_size: int | None) -> int:
    """Bytes `quantize(torch.empty(shape), kind, group_size)` produces, from the shape alone."""
    *lead, k = shape
    rows = 1
    for d in lead:
        rows *= d
    groups = k // group_for(k, group_size)
    if kind == "int8":
        return rows * k + rows * groups * 4
    if kind == "int4":
        return rows * k // 2 + rows * groups * 2 * 2
    raise ValueError(f"can quantize to int8 or int4, not {kind!r}")
