"""Time one layer's expert products: torch._grouped_mm against the Triton tile kernel (bf16, int8, int4 weights).

    python bench/experts.py                              # 26b-a4b expert shapes on CUDA, 2048 and 8 token-expert rows
    TRITON_INTERPRET=1 python bench/experts.py --shape tiny --device cpu    # a dry run of the script itself

For each row count (2048: a 256-token canvas at batch 1 with top-8 routing; 8: one token), rows are routed to
uniformly random experts; a product is gate_up [E, 2I, H] then down [E, H, I] over the rows of each expert, as
`Experts` runs them. Prints ms per layer (mean of 10 after 2 warm-up calls, CUDA events) and the weight bytes of the
experts touched divided by that time. Random weights; timings only, no outputs are compared (tests do that).
"""

from __future__ import annotations

import argparse
import time

import torch

from dgemma.config import preset
from dgemma.kernels import triton_dequant
from dgemma.quant.formats import quantize


def _ms(fn, device: torch.device, n: int = 10) -> float:
    for _ in range(2):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) * 1e3 / n
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="26b-a4b", help="preset whose expert shapes are timed (default: 26b-a4b)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, nargs="+", default=[2048, 8], help="token-expert rows (default: 2048 8)")
    args = p.parse_args()
    cfg, device = preset(args.shape), torch.device(args.device)
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    gen = torch.Generator(device=device).manual_seed(0)
    gate_up = (torch.randn(e, 2 * i, h, device=device, generator=gen) * 0.02).bfloat16()
    down = (torch.randn(e, h, i, device=device, generator=gen) * 0.02).bfloat16()
    formats = {"bf16": (gate_up, down), "int8": (quantize(gate_up, "int8"), quantize(down, "int8")),
               "int4 g64": (quantize(gate_up, "int4", 64), quantize(down, "int4", 64))}
    nbytes = {name: sum(t.numel() * t.element_size() for w in pair for t in (w.tensors() if name != "bf16" else [w]))
              for name, pair in formats.items()}
    print(f"{args.shape} experts ({e} x [{2 * i}, {h}] and [{h}, {i}]) on {device}")
    print(f"{'rows':>5}  {'kernel':<24} {'ms/layer':>9} {'GB/s':>7}")
    for rows in args.rows:
        counts = torch.bincount(torch.randint(0, e, (rows,), device=device, generator=gen), minlength=e)  # [E]
        touched = (counts > 0).float().mean().item()  # share of the experts' weights read
        xs = torch.randn(rows, h, device=device, generator=gen).bfloat16()  # [P, H]
        hs = torch.randn(rows, i, device=device, generator=gen).bfloat16()  # [P, I]
        runs = {}
        if device.type == "cuda" and hasattr(torch, "_grouped_mm"):
            offsets = counts.cumsum(0).to(torch.int32)
            runs["torch._grouped_mm bf16"] = ("bf16", lambda: (
                torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offsets),
                torch._grouped_mm(hs, down.transpose(1, 2), offs=offsets)))
        for name, (gu, dn) in formats.items():
            runs[f"triton {name}"] = (name, lambda gu=gu, dn=dn: (
                triton_dequant.grouped_linear(xs, counts, gu), triton_dequant.grouped_linear(hs, counts, dn)))
        for label, (name, fn) in runs.items():
            ms = _ms(fn, device)
            print(f"{rows:>5}  {label:<24} {ms:>9.3f} {nbytes[name] * touched / ms / 1e6:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
