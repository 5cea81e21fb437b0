"""int4 expert products on x86 CPUs through PyTorch's packed int4 kernel (`torch._weight_int4pack_mm_for_cpu`).

The kernel decodes the 4-bit codes inside its product loop, where `dequant_matmul` first writes a decoded tile and
then multiplies it. With the few rows an expert gets at batch 1 the decoding is the cost, so this is faster there:
on a 2-core AMX Xeon, one `26b-a4b` layer's 128 experts at 16 rows each (bfloat16 activations) took 94 instead of
285 ms for gate_up and 50 instead of 174 ms for down. Its cost grows with the rows, and at about 64 rows per expert
the two are even. It runs only with AVX2 or AVX-512 kernels (PyTorch's generic one is tens of times slower).

The kernel takes its own nibble order (uint8 [N, K / 2], interleaved across blocks of output channels), bfloat16
activations, and per-group (scale, zero) pairs [K / G, N, 2] in bfloat16 with value (q - 8) * scale + zero; dgemma's
int4 value is q * scale + offset, so zero = offset + 8 * scale (about bfloat16's rounding, 2e-3 relative, off the
float16 scales). The nibble order is read from PyTorch's own packing function, once per shape (`_order`), so it is
whatever the installed PyTorch uses: `to_kernel_layout` packs with that function, `from_kernel_layout` undoes it with
that order.
Must not: know modules; decide which weights use it (`QuantExperts` does).
"""

from __future__ import annotations

import functools
import os

import torch

from ..quant.formats import QTensor, pack_int4, unpack_int4

GROUPS = (32, 64, 128, 256)
ENABLED = os.environ.get("DGEMMA_CPU_INT4_KERNEL", "1") != "0"


@functools.cache
def _capable() -> bool:
    """Whether PyTorch has the kernel and runs its AVX2 or AVX-512 version on this CPU."""
    has = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")
    return has and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def supported(q: QTensor) -> bool:
    """Whether stacked int4 expert weights q [E, N, K] on the CPU can use the kernel: `ENABLED`, a capable CPU, a
    group size it takes and N a multiple of 16."""
    return ENABLED and q.kind == "int4" and q.codes.dim() == 3 and q.codes.device.type == "cpu" and \
        q.group_size in GROUPS and q.shape[1] % 16 == 0 and _capable()


@functools.cache
def _order(n: int, k: int) -> torch.Tensor:
    """int32 [N * K]: for each nibble of the kernel's packing of an [N, K] code matrix (byte i's low nibble is nibble
    2i), the row-major index of the code it holds. Found by packing the digits of every index, base 16."""
    index = torch.arange(n * k, dtype=torch.int64, device="cpu")
    source = torch.zeros(n * k, dtype=torch.int64, device="cpu")
    shift = 0
    while (n * k - 1) >> shift:
        digits = ((index >> shift) & 15).view(n, k).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(digits, 1)  # uint8 [N, K / 2]
        source |= torch.stack([packed & 15, packed >> 4], -1).flatten().to(torch.int64) << shift
        shift += 4
    if not torch.equal(source.sort().values, index):
        raise RuntimeError(f"PyTorch's int4 packing of [{n}, {k}] is not a reordering of the codes")
    return source.to(torch.int32)


def to_kernel_layout(codes: torch.Tensor, group: int) -> torch.Tensor:
    """int4 codes uint8 [E, N, K / 2] in dgemma's layout (group `group`) -> a new tensor in the kernel's order, packed
    by PyTorch's own function (about 3 ms for a 1408 x 2816 expert on a 2-core CPU)."""
    out = torch.empty_like(codes)
    for i in range(codes.shape[0]):
        out[i] = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(codes[i], group).to(torch.int32), 1)
    return out


def from_kernel_layout(codes: torch.Tensor, group: int) -> torch.Tensor:
    """The inverse of `to_kernel_layout`, into a new tensor: uint8 [E, N, K / 2] in dgemma's layout, on the codes'
    device."""
    e, n, half = codes.shape
    order = _order(n, 2 * half).to(codes.device)
    out = torch.empty_like(codes)
    logical = torch.empty(n * 2 * half, dtype=torch.uint8, device=codes.device)
    for i in range(e):
        logical[order] = torch.stack([codes[i] & 15, codes[i] >> 4], -1).flatten()
        out[i] = pack_int4(logical.view(n, 2 * half), group)
    return out


def grouped_linear(xs: torch.Tensor, counts: torch.Tensor, q: QTensor) -> torch.Tensor:
    """xs [P, K] -> [P, N] in xs's dtype: the counts[e] consecutive rows from sum(counts[:e]) on times W[e]^T, for
    int4 weights q [E, N, K] whose codes are in the kernel's order (`to_kernel_layout`); products in bfloat16."""
    x = xs.to(torch.bfloat16)  # [P, K]
    out = xs.new_empty(xs.shape[0], q.shape[1])  # [P, N]
    start = 0
    pairs = torch.empty(q.scale.shape[2], q.shape[1], 2, dtype=torch.bfloat16)  # [K/G, N, (scale, zero)]
    for i, count in enumerate(counts.tolist()):
        if count:
            scale = q.scale[i].t()  # [K/G, N]
            pairs[..., 0] = scale
            pairs[..., 1] = torch.add(q.offset[i].t().float(), scale.float(), alpha=8)
            out[start:start + count] = torch._weight_int4pack_mm_for_cpu(x[start:start + count], q.codes[i],
                                                                         q.group_size, pairs)
            start += count
    return out
