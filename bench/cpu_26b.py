"""Run 26b-a4b in int4 on the CPU: resident memory and seconds per denoising step, without a float copy ever existing.

    python bench/cpu_26b.py                               # 26b-a4b, experts int4 (group 64), the rest int8, 4 steps
    python bench/cpu_26b.py --shape small --steps 2       # a quick dry run of the script itself

`dgemma bench` builds float weights first and quantizes them, which for 26b-a4b needs about 50 GB. Here every
quantizable weight is made directly as random codes (uniform; scales and offsets set so weights spread like
N(0, 0.02)) in the layout `dgemma quantize --to int4 --group-size 64 --dense int8` writes (every quantized weight in
groups of 64 inputs: the experts int4, the other linears and the tied embedding/head int8), the norms, router and
scalars in float32, and the model is assembled tensor by tensor with the loader's
`build`. Then one canvas is generated at batch 1 with a fixed number of denoising steps (EOS off) and the script prints
the resident set of the process (VmRSS: after building, and its peak VmHWM over the whole run), the weights' bytes and
the seconds per step (mean gap between consecutive steps; the first step, which includes warm-up, is left out).
Random weights: timings and memory only; the tokens mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from dgemma.api import Model
from dgemma.config import GenerationSettings, ModelConfig, preset
from dgemma.model.diffusion_gemma import DiffusionGemma
from dgemma.quant.formats import QTensor, group_for
from dgemma.quant.modules import build, role, weight_kind


def _status_kib(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def random_qtensor(shape: torch.Size, kind: str, group: int | None, gen: torch.Generator) -> QTensor:
    """Uniform random codes of `kind` for a weight [..., N, K], with scales (and int4 offsets) making the values
    spread with a standard deviation of about 0.02."""
    *lead, k = shape
    groups = k // group_for(k, group)
    if kind == "int8":
        codes = torch.randint(-127, 128, (*lead, k), dtype=torch.int8, generator=gen)
        return QTensor("int8", codes, torch.full((*lead, groups), 0.02 * 3**0.5 / 127))  # uniform: std = a / sqrt(3)
    codes = torch.randint(0, 256, (*lead, k // 2), dtype=torch.uint8, generator=gen)  # two 4-bit codes per byte
    step = 0.02 * 12**0.5 / 16  # 16 levels spread over a uniform of std 0.02
    scale = torch.full((*lead, groups), step, dtype=torch.float16)
    return QTensor("int4", codes, scale, torch.full_like(scale, -7.5 * step))


def entries(cfg: ModelConfig, group: int, seed: int):
    """(parameter name, value) for every tensor of `cfg`, quantizable ones as random QTensors, made one at a time."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in DiffusionGemma(cfg).state_dict().items()}
    for name, shape in shapes.items():
        kind = weight_kind(role(name), "int4", "int8", "int8")
        if kind is not None:
            yield name, random_qtensor(shape, kind, group, gen)
        elif name.endswith("_layer_scalars"):
            for i in range(shape[0]):
                yield f"{name.removesuffix('_layer_scalars')}_layer_scalars.{i}", torch.ones(())
        elif name.endswith(("norm.weight", "scale")):
            yield name, torch.ones(shape)
        else:  # the router
            yield name, torch.randn(shape, generator=gen) * 0.02


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="26b-a4b", choices=["26b-a4b", "small", "tiny"])
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the one canvas (default: 4)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be at least 2: the first step, which includes warm-up, is not timed")

    cfg = dataclasses.replace(preset(args.shape), eos_token_ids=())
    start = time.perf_counter()
    net = build(cfg, entries(cfg, args.group_size, args.seed), torch.float32, torch.device("cpu"), args.shape)
    built, rss_built = time.perf_counter() - start, _status_kib("VmRSS")
    weight_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    model = Model(net, GenerationSettings())
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    times: list[float] = []
    model.generate(prompt.tolist(), max_new_tokens=cfg.canvas_length, max_denoising_steps=args.steps,
                   stability_threshold=args.steps + 1, seed=args.seed, on_step=lambda _: times.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(times, times[1:])]
    per_step = sum(gaps) / len(gaps) if gaps else float("nan")
    gb = 1024 / 1e9  # KiB -> GB
    row = {"shape": args.shape, "threads": torch.get_num_threads(), "weights (GB)": f"{weight_bytes / 1e9:.2f}",
           "built in (s)": f"{built:.0f}", "RSS built (GB)": f"{rss_built * gb:.2f}",
           "peak RSS (GB)": f"{_status_kib('VmHWM') * gb:.2f}", "s / step": f"{per_step:.2f}",
           f"tok/s at {args.steps} steps": f"{cfg.canvas_length / (per_step * args.steps):.2f}"}
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
