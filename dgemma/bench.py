"""`dgemma bench`: generation speed of a named shape with random weights, or of a checkpoint.

Owns: building the benchmark network (random weights drawn straight on the target device in the target dtype, or a
checkpoint), random prompts, fixed-step or adaptive runs over several batch sizes with warm-up and repeats, the
optional comparisons in the same process (transformers' `DiffusionGemmaForBlockDiffusion` on the very same weight
tensors; autoregressive decoding with `ar_generate`), the measurements, and their table, JSON and PNG.
Must not: change the engine, the network or the sampler; assert timings (tests check structure only).

Runs go implementation by implementation (the last `--quant` format is quantized in place after the float runs, to
bound the peak), or with `interleave` every implementation is warmed first and then each takes one measured run in
turn, `repeat` rounds, so a machine whose speed drifts over minutes slows every implementation alike (every format
is then in memory at once).
What is measured, per implementation and batch size (the median over `repeat` runs is reported):
- decode tokens/s = new tokens / denoising time. The denoising time comes from a timestamp taken after every
  denoising step (our `on_step` callback; the reference's draft streamer): one step costs the mean gap between
  consecutive steps of a canvas, and a canvas's denoising time is its step count times that. Prompt encoding and
  the commits between canvases are thus left out. For autoregressive decoding a token step likewise costs the mean
  gap between consecutive tokens reaching the host, leaving out the prefill and the first token step (where a GPU
  captures its CUDA graph), and the decode time is that step times the passes after the prefill (below three tokens:
  the whole call over its passes).
- end-to-end tokens/s = new tokens / wall time of the whole generate call (prompt encoding included).
- ms per step: one batched denoising step (autoregressive: one forward after the prefill).
- tokens per forward: per row, generated tokens / decoder passes (the engine's own statistic), averaged.
- peak memory: on CUDA `torch.cuda.max_memory_allocated` during the run (weights included); on the CPU the growth
  of the process's resident set over the run (VmHWM after, reset through /proc/self/clear_refs, minus VmRSS before).
- roofline (CUDA only): weight bytes one step reads / measured step time, as a fraction of the device-copy bandwidth
  measured in the same process (2 x bytes of a large tensor copy / its time). Experts count in proportion to the
  share that uniform top-k routing of the step's tokens is expected to touch; the tied embedding counts twice in
  self-conditioned steps (head and soft embeddings).
New tokens are `batch x new_tokens`: EOS is switched off for the benchmark so every row does the same work.
Fixed-step mode sets stability_threshold above the step count, so adaptive stopping can never fire, and checks that
every canvas ran exactly that many steps.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .api import Model, _dtype, load, resolve_device
from .checkpoint import write_atomic
from .config import PRESET_NAMES, GenerationSettings, ModelConfig, preset
from .engine.ar import ar_generate
from .model.diffusion_gemma import DiffusionGemma
from .quant.formats import INT4_GROUP_SIZES
from .quant.modules import is_quantized, quantize_model

QUANT_KINDS = ("int8", "int4")
IMPLS = ("ours", "reference", "ar") + QUANT_KINDS
DEFAULT_FIXED_STEPS = 16
_COPY_BYTES = 1 << 30  # the bandwidth probe's tensor size
# A small vision tower for the reference's config (it builds a ~170M-parameter one otherwise); no image is used.
_TINY_VISION = dict(model_type="gemma4_vision", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=8, intermediate_size=32)


@dataclass(frozen=True)
class BenchOptions:
    shape: str = "small"  # a preset name; ignored when `model` is given
    model: str | None = None  # checkpoint directory or Hub id
    batches: tuple[int, ...] = (1,)
    prompt_len: int = 64
    new_tokens: int | None = None  # default: one canvas
    steps: int | None = None  # fixed mode: default 16; adaptive: the checkpoint's max_denoising_steps
    adaptive: bool = False
    device: str = "cpu"
    dtype: str | None = None  # default: float32 on the CPU, bfloat16 elsewhere; a checkpoint's stored dtype
    repeat: int = 1
    warmup: int = 1
    seed: int = 0
    compare: tuple[str, ...] = ()  # "reference" and/or "ar"
    reference_experts: str | None = None  # transformers' experts_implementation; None = its default
    force: bool = False
    quant: tuple[str, ...] = ()  # also run these weight-only formats ("int8", "int4"), quantized from the same weights
    group_size: int = 64  # int4 group size for `quant`
    interleave: bool = False  # measured runs alternate between implementations; every format stays in memory

    def __post_init__(self):
        if self.model is None and self.shape not in PRESET_NAMES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {', '.join(PRESET_NAMES)}")
        if not self.batches or any(not isinstance(b, int) or b <= 0 for b in self.batches):
            raise ValueError(f"batch sizes must be positive integers, got {list(self.batches)}")
        for name, low in (("prompt_len", 1), ("repeat", 1), ("warmup", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.new_tokens is not None and self.new_tokens <= 0:
            raise ValueError(f"new-tokens must be a positive integer, got {self.new_tokens}")
        if self.steps is not None and self.steps < 2:
            raise ValueError(f"steps must be >= 2 (a step is timed as the gap between two steps), got {self.steps}")
        unknown = set(self.compare) - {"reference", "ar"}
        if unknown:
            raise ValueError(f"unknown comparison {min(unknown)!r}; choose reference or ar")
        unknown = set(self.quant) - set(QUANT_KINDS)
        if unknown:
            raise ValueError(f"unknown quantized format {min(unknown)!r}; choose {' or '.join(QUANT_KINDS)}")
        if self.quant and self.device == "meta":
            raise ValueError("--quant needs real weights; `dgemma info` reports a quantized checkpoint's bytes")


# ---- the network ------------------------------------------------------------------------------------------------
def random_network(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> DiffusionGemma:
    """`DiffusionGemma.init_weights`' scheme (N(0, 0.02) weights, norms/scales/layer scalars 1), drawn on `device`
    directly in `dtype`, so a large shape never exists in float32 or on the host."""
    with torch.device("meta"):
        net = DiffusionGemma(cfg)
    net = net.to(dtype=dtype).to_empty(device=device)
    if device.type == "meta":
        return net.eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("norm.weight", "scale")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        net.encoder_layer_scalars.fill_(1.0)
        net.decoder_layer_scalars.fill_(1.0)
    return net.eval().requires_grad_(False)


def quantized(net: DiffusionGemma, kind: str, group_size: int | None, in_place: bool) -> DiffusionGemma:
    """`net` with its weights in `kind`; unless `in_place`, a copy that shares every float tensor with `net` (only
    the quantized weights are new), so the float model stays usable."""
    if not in_place:
        net = copy.deepcopy(net, memo={id(t): t for t in [*net.parameters(), *net.buffers()]})
    return quantize_model(net, kind, group_size)


def weight_bytes(net: DiffusionGemma, tokens: int, decoder: bool = True, conditioned: float = 0.0) -> int:
    """Bytes of weights one forward over `tokens` tokens reads: every dense weight once, the experts in the share
    that uniform top-k routing is expected to touch (1 - (1 - k/E)^tokens). The encoder skips self-conditioning;
    a decoder pass that reads the previous step's logits (a share `conditioned` of the steps: all but each canvas's
    first) reads the tied embedding a second time, for the soft embeddings. Quantized weights count their codes,
    scales and offsets."""
    cfg = net.config
    hit = 1.0 - (1.0 - cfg.top_k_experts / cfg.num_experts) ** tokens
    total = 0.0
    for name, p in net.state_dict().items():
        size = p.numel() * p.element_size()
        if name.startswith("self_conditioning.") and not decoder:
            continue
        if name.startswith("embed_tokens.") and decoder:
            size *= 1.0 + conditioned
        total += size * hit if ".experts." in name else size
    return int(total)


def _reference_state(net: DiffusionGemma, names) -> dict[str, torch.Tensor]:
    """`net`'s tensors under transformers' names `names` (views of the same storage: nothing is copied). The encoder
    and decoder share every weight; each side has its own layer scalars; the head is the tied embedding."""
    ours = net.state_dict()
    sides = {"model.encoder.language_model.": "encoder_layer_scalars", "model.decoder.": "decoder_layer_scalars"}
    state = {}
    for name in names:
        if name == "lm_head.weight":
            state[name] = ours["embed_tokens.weight"]
        for prefix, scalars in sides.items():
            if not name.startswith(prefix):
                continue
            local = name[len(prefix):]
            if local in ours:
                state[name] = ours[local]
            elif local.startswith("layers.") and local.endswith(".layer_scalar"):
                i = int(local.split(".")[1])
                state[name] = ours[scalars][i:i + 1]
    return state


def reference_model(net: DiffusionGemma, experts: str | None):
    """transformers' DiffusionGemmaForBlockDiffusion holding `net`'s weight tensors (shared, not copied).

    It is first loaded from untouched placeholder tensors on the host (so transformers sets up its buffers and the
    unused vision tower itself), then our tensors are assigned in their place; nothing weight-sized is ever copied."""
    try:
        import transformers
        from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    except ImportError:
        raise ValueError("--compare reference needs transformers==5.23.0 (pip install -e '.[test]')") from None
    cfg = net.config
    config = DiffusionGemmaConfig(text_config=cfg.to_hf_dict()["text_config"], vision_config=_TINY_VISION,
                                  canvas_length=cfg.canvas_length)
    kw = {} if experts is None else {"experts_implementation": experts}
    with torch.device("meta"):
        names = DiffusionGemmaForBlockDiffusion(config).state_dict().keys()
    shared = _reference_state(net, names)
    placeholders = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in shared.items()}  # never written to
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the vision tower's weights are "missing" by design
    transformers.logging.disable_progress_bar()
    try:
        ref = DiffusionGemmaForBlockDiffusion.from_pretrained(None, config=config, state_dict=placeholders,
                                                              dtype=net.dtype, **kw)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    del placeholders
    ref.load_state_dict(shared, strict=False, assign=True)
    ref = ref.to(net.device).eval().requires_grad_(False)  # moves only the buffers and the vision tower
    mine = net.layers[0].experts.down_proj.data_ptr()
    if {ref.model.decoder.layers[0].experts.down_proj.data_ptr(),
            ref.model.encoder.language_model.layers[0].experts.down_proj.data_ptr()} != {mine}:
        raise RuntimeError("the reference model does not hold the benchmark's weight tensors")
    return ref


# ---- timing helpers ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Timestamps of denoising steps, grouped by canvas."""

    def __init__(self, device: torch.device):
        self.device = device
        self.canvases: list[list[float]] = []

    def tick(self, canvas: int) -> None:
        _sync(self.device)
        while len(self.canvases) <= canvas:
            self.canvases.append([])
        self.canvases[canvas].append(time.perf_counter())

    def steps(self) -> list[int]:
        return [len(c) for c in self.canvases]

    def step_seconds(self) -> float:
        gaps = sum(c[-1] - c[0] for c in self.canvases if len(c) > 1)
        count = sum(len(c) - 1 for c in self.canvases if len(c) > 1)
        if count == 0:
            raise RuntimeError("every canvas ran a single step; a step cannot be timed (use --steps >= 2)")
        return gaps / count


class _DraftStreamer:
    """The reference's streamer protocol: `put` gets the prompt and then each committed canvas, `put_draft` the
    draft after every denoising step."""

    def __init__(self, clock: StepClock):
        self.clock = clock
        self.canvas = -1

    def put(self, value) -> None:
        self.canvas += 1

    def put_draft(self, value=None, logits=None) -> None:
        self.clock.tick(self.canvas)

    def end(self) -> None:
        pass


class PeakMemory:
    """Peak memory of one run: CUDA max allocated, or the CPU resident-set growth (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"/proc/self/status has no {field}")

    def __enter__(self) -> PeakMemory:
        self.bytes = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu" and Path("/proc/self/status").is_file():
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            except OSError:
                pass  # VmHWM then holds the process's peak so far: still an upper bound
            self.before = self._status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.device.type == "cpu" and Path("/proc/self/status").is_file():
            self.bytes = max(self._status("VmHWM") - self.before, 0)


def copy_bandwidth(device: torch.device, nbytes: int = _COPY_BYTES, repeat: int = 5) -> float:
    """Device memory bandwidth in bytes/s from copying one large tensor (each copy reads and writes nbytes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    return 2 * nbytes * repeat / seconds


# ---- one run of each implementation -----------------------------------------------------------------------------
@dataclass
class Run:
    seconds: float  # the whole generate call
    decode_seconds: float
    step_seconds: float
    steps_per_canvas: list[int]  # batched steps per canvas (autoregressive: empty)
    row_steps: list[list[int]]  # per row, decoder passes on each canvas (the engine's own count where it has one)
    tokens_per_forward: float
    peak_bytes: int | None


def _run_ours(model: Model, prompts: list[list[int]], kw: dict, seed: int) -> Run:
    device = model.device
    clock = StepClock(device)
    with PeakMemory(device) as mem:
        _sync(device)
        start = time.perf_counter()
        result = model.generate(prompts, seed=seed, on_step=lambda e: clock.tick(e.canvas_index), **kw)
        _sync(device)
        seconds = time.perf_counter() - start
    steps, step = clock.steps(), clock.step_seconds()
    return Run(seconds, step * sum(steps), step, steps, result.steps, statistics.fmean(result.tokens_per_forward),
               mem.bytes)


def _run_reference(ref, prompts: list[list[int]], kw: dict, seed: int, device: torch.device) -> Run:
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    ids = torch.tensor(prompts, device=device)
    clock = StepClock(device)
    settings = dict(kw)
    entropy_bound = settings.pop("entropy_bound")
    with PeakMemory(device) as mem:
        torch.manual_seed(seed)
        _sync(device)
        start = time.perf_counter()
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), streamer=_DraftStreamer(clock),
                           sampler_config=EntropyBoundSamplerConfig(entropy_bound=entropy_bound),
                           eos_token_id=None, **settings)
        _sync(device)
        seconds = time.perf_counter() - start
    steps, step = clock.steps(), clock.step_seconds()
    per_forward = statistics.fmean(out.tokens_per_forward.float().tolist())
    return Run(seconds, step * sum(steps), step, steps, [steps] * len(prompts), per_forward, mem.bytes)


def _run_ar(net: DiffusionGemma, prompts: list[list[int]], new_tokens: int) -> Run:
    """One `ar_generate` call. A token step costs the mean gap between consecutive tokens reaching the host, leaving
    out the prefill and the first token step (which captures the CUDA graph on a GPU); the decode time is that step
    times the passes after the prefill. Below three tokens there is no such gap: the whole call over its passes."""
    device = net.device
    stamps: list[float] = []
    with PeakMemory(device) as mem:
        _sync(device)
        start = time.perf_counter()
        result = ar_generate(net, prompts, new_tokens, stop_ids=[], on_token=lambda: stamps.append(time.perf_counter()))
        _sync(device)
        seconds = time.perf_counter() - start
    step = (stamps[-1] - stamps[1]) / (len(stamps) - 2) if len(stamps) > 2 else seconds / result.forwards
    per_forward = statistics.fmean(len(row) / result.forwards for row in result.token_ids)
    return Run(seconds, step * max(result.forwards - 1, 1), step, [], [], per_forward, mem.bytes)


# ---- the benchmark ----------------------------------------------------------------------------------------------
def _settings(base: GenerationSettings, opts: BenchOptions, new_tokens: int) -> GenerationSettings:
    if opts.adaptive:
        return base.replace(max_new_tokens=new_tokens, max_denoising_steps=opts.steps)
    steps = opts.steps or DEFAULT_FIXED_STEPS
    # Stability over more steps than a canvas has can never be reached, so no canvas stops early.
    return base.replace(max_new_tokens=new_tokens, max_denoising_steps=steps, stability_threshold=steps + 1)


def _load(opts: BenchOptions) -> tuple[Model, str]:
    device = resolve_device(opts.device)
    if opts.model is not None:
        model = load(opts.model, device=device, dtype=opts.dtype)
        label = str(opts.model)
    else:
        dtype = _dtype(opts.dtype) or (torch.float32 if device.type == "cpu" else torch.bfloat16)
        cfg = preset(opts.shape)
        if opts.shape == "26b-a4b" and device.type == "cpu" and not opts.force:
            total, _ = cfg.parameter_counts()
            raise ValueError(f"26b-a4b needs about {total * dtype.itemsize / 1e9:.0f} GB for its weights in "
                             f"{str(dtype).removeprefix('torch.')} on the CPU; run it with --device cuda, use "
                             "--device meta to see the weight bytes per step, or pass --force")
        model = Model(random_network(cfg, device, dtype, opts.seed), GenerationSettings())
        label = opts.shape
    if is_quantized(model.net) and (opts.quant or "reference" in opts.compare):
        raise ValueError(f"{label} is already quantized: --quant and --compare reference need float weights")
    # EOS off: every row generates every requested token, so all implementations do the same work.
    net = model.net
    net.config = dataclasses.replace(net.config, eos_token_ids=())
    return Model(net, model.settings, None, model.path), label


def _median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


def run_bench(opts: BenchOptions, log: Callable[[str], None] = lambda _: None) -> dict:
    """Run the benchmark described by `opts`; returns a JSON-ready dict (see `format_table` for the fields)."""
    model, label = _load(opts)
    net, cfg, device = model.net, model.config, model.device
    new_tokens = opts.new_tokens or cfg.canvas_length
    settings = _settings(model.settings, opts, new_tokens)
    if opts.prompt_len + math.ceil(new_tokens / cfg.canvas_length) * cfg.canvas_length > cfg.max_position_embeddings:
        raise ValueError(f"a {opts.prompt_len}-token prompt plus {new_tokens} new tokens exceed the model's context "
                         f"of {cfg.max_position_embeddings} positions")
    total_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    result = {
        "model": label, "device": str(device), "dtype": str(net.dtype).removeprefix("torch."),
        "mode": "adaptive" if opts.adaptive else "fixed", "max_denoising_steps": settings.max_denoising_steps,
        "prompt_len": opts.prompt_len, "new_tokens": new_tokens, "canvas_length": cfg.canvas_length,
        "batches": list(opts.batches), "repeat": opts.repeat, "warmup": opts.warmup, "seed": opts.seed,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "weight_bytes": total_bytes,
        "step_weight_bytes": {str(b): weight_bytes(net, b * cfg.canvas_length) for b in opts.batches},
        "bandwidth_bytes_per_s": None, "reference_experts": None, "runs": [], "ratios": [],
    }
    if device.type == "meta":
        return result
    if device.type == "cuda":
        result["bandwidth_bytes_per_s"] = copy_bandwidth(device)
    ref = None
    if "reference" in opts.compare:
        log("building the transformers reference on the same weights")
        ref = reference_model(net, opts.reference_experts)
        result["reference_experts"] = ref.config._experts_implementation
    kw = dict(max_new_tokens=settings.max_new_tokens, max_denoising_steps=settings.max_denoising_steps,
              entropy_bound=settings.entropy_bound, t_min=settings.t_min, t_max=settings.t_max,
              stability_threshold=settings.stability_threshold,
              confidence_threshold=float(settings.confidence_threshold))
    gen = torch.Generator().manual_seed(opts.seed)
    prompts = {b: torch.randint(3, cfg.vocab_size, (b, opts.prompt_len), generator=gen).tolist()
               for b in opts.batches}
    measure = functools.partial(_measure, kw=kw, new_tokens=new_tokens, opts=opts, log=log)
    record = functools.partial(_record, result, new_tokens=new_tokens, settings=settings, opts=opts, log=log)
    entries = [(impl, model, ref, prompts[batch]) for batch in opts.batches
               for impl in ["ours"] + [name for name in ("reference", "ar") if name in opts.compare]]
    def measure_all(these: list) -> None:  # a function, so no loop variable keeps a model alive after it
        for entry in these:
            record(*entry, measure(*entry))

    if not opts.interleave:
        measure_all(entries)
        entries, ref = [], None  # frees the reference before the last format is quantized in place
    for i, kind in enumerate(opts.quant):
        log(f"quantizing the weights to {kind}")
        in_place = i == len(opts.quant) - 1 and not opts.interleave
        qnet = quantized(net, kind, opts.group_size if kind == "int4" else None, in_place=in_place)
        qmodel = Model(qnet, model.settings, None, model.path)
        quant_entries = [(kind, qmodel, None, prompts[batch]) for batch in opts.batches]
        if opts.interleave:
            entries += quant_entries
            continue
        measure_all(quant_entries)
        del qnet, qmodel, quant_entries
    if opts.interleave:  # warm every implementation, then one measured run of each in turn, `repeat` times
        runs = [measure(*entry, repeat=0) for entry in entries]
        for i in range(opts.repeat):
            log(f"interleaved round {i + 1}/{opts.repeat}")
            for entry, done in zip(entries, runs):  # on a GPU a warm-up recaptures the graphs of the entry's shape
                done += measure(*entry, repeat=1, warmup=int(device.type == "cuda"))
        for entry, done in zip(entries, runs):
            record(*entry, done)
    result["ratios"] = _ratios(result["runs"])
    return result


def _record(result: dict, impl: str, model: Model, ref, prompts: list[list[int]], runs: list[Run], *, new_tokens: int,
            settings: GenerationSettings, opts: BenchOptions, log: Callable[[str], None]) -> None:
    """Check one implementation's runs at one batch size (fixed-step runs ran every step) and append their summary
    to `result`."""
    if impl != "ar" and not opts.adaptive:
        counts = [s for r in runs for s in r.steps_per_canvas + [n for row in r.row_steps for n in row]]
        wrong = [s for s in counts if s != settings.max_denoising_steps]
        if wrong:
            raise RuntimeError(f"{impl}: fixed-step mode ran {wrong[0]} steps on a canvas, "
                               f"not {settings.max_denoising_steps}")
    summary = _summary(impl, len(prompts), new_tokens, runs, model.net, result["bandwidth_bytes_per_s"])
    result["runs"].append(summary)
    log(f"{impl} batch {len(prompts)}: {summary['decode_tokens_per_s']:.1f} decode tok/s, "
        f"{summary['end_to_end_tokens_per_s']:.1f} end-to-end tok/s, {summary['ms_per_step']:.1f} ms/step")


def _measure(impl: str, model: Model, ref, prompts: list[list[int]], *, kw: dict, new_tokens: int, opts: BenchOptions,
             log: Callable[[str], None], repeat: int | None = None, warmup: int | None = None) -> list[Run]:
    """Warm-up runs (2 steps per canvas; autoregressive: 2 tokens), then the measured runs of one implementation
    (`warmup` and `repeat` default to the options')."""
    warmup = opts.warmup if warmup is None else warmup
    repeat = opts.repeat if repeat is None else repeat
    warm_kw = {**kw, "max_denoising_steps": min(2, kw["max_denoising_steps"])}

    def once(warm: bool) -> Run:
        if impl not in ("reference", "ar"):  # ours, in its loaded or a quantized format
            return _run_ours(model, prompts, warm_kw if warm else kw, opts.seed)
        if impl == "reference":
            return _run_reference(ref, prompts, warm_kw if warm else kw, opts.seed, model.device)
        return _run_ar(model.net, prompts, min(new_tokens, 2) if warm else new_tokens)

    for _ in range(warmup):
        once(True)
    runs = []
    for i in range(repeat):
        log(f"{impl} batch {len(prompts)}: run {i + 1}/{repeat}")
        runs.append(once(False))
    return runs


def _summary(impl: str, batch: int, new_tokens: int, runs: list[Run], net: DiffusionGemma,
             bandwidth: float | None) -> dict:
    tokens = batch * new_tokens
    decode = statistics.median(r.decode_seconds for r in runs)
    step = statistics.median(r.step_seconds for r in runs)
    seconds = statistics.median(r.seconds for r in runs)
    if impl == "ar":
        per_step = weight_bytes(net, batch, decoder=False)
    else:
        steps = [s for r in runs for s in r.steps_per_canvas]
        per_step = weight_bytes(net, batch * net.config.canvas_length, conditioned=1 - len(steps) / sum(steps))
    roofline = per_step / step / bandwidth if bandwidth else None
    peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
    return {
        "impl": impl, "batch": batch, "new_tokens": tokens,
        "decode_tokens_per_s": tokens / decode, "end_to_end_tokens_per_s": tokens / seconds,
        "ms_per_step": 1e3 * step, "tokens_per_forward": statistics.median(r.tokens_per_forward for r in runs),
        "steps_per_canvas": _median_run(runs).steps_per_canvas, "seconds": seconds, "decode_seconds": decode,
        "peak_memory_bytes": max(peaks) if peaks else None, "roofline_fraction": roofline,
        "step_weight_bytes": per_step,
        "repeats": [dataclasses.asdict(r) for r in runs],
    }


def _ratios(runs: list[dict]) -> list[dict]:
    """Ours against the reference and autoregressive decoding; each quantized format against ours unquantized."""
    by_key = {(r["impl"], r["batch"]): r for r in runs}
    pairs = [("ours", "reference"), ("ours", "ar")] + [(kind, "ours") for kind in QUANT_KINDS]
    out = []
    for impl, against in pairs:
        for (name, batch), mine in by_key.items():
            theirs = by_key.get((against, batch))
            if name == impl and theirs is not None:
                out.append({"batch": batch, "impl": impl, "against": against,
                            "decode": mine["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
                            "end_to_end": mine["end_to_end_tokens_per_s"] / theirs["end_to_end_tokens_per_s"]})
    return sorted(out, key=lambda x: x["batch"])


# ---- output -----------------------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    """The human-readable summary of a `run_bench` result."""
    gib = 2**30
    lines = [
        (f"model {result['model']} on {result['device']} in {result['dtype']}, {result['threads']} threads: "
         f"prompt {result['prompt_len']}, {result['new_tokens']} new tokens, {result['mode']} "
         f"{result['max_denoising_steps']} steps, median of {result['repeat']} (warm-up {result['warmup']})"),
        f"weights {result['weight_bytes'] / gib:.3f} GiB; read per denoising step: " + ", ".join(
            f"batch {b} {n / gib:.3f} GiB" for b, n in result["step_weight_bytes"].items()),
    ]
    if result["bandwidth_bytes_per_s"]:
        lines.append(f"device-copy bandwidth {result['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s")
    if result["reference_experts"]:
        lines.append(f"transformers reference with experts_implementation={result['reference_experts']}")
    if not result["runs"]:
        return "\n".join(lines)
    header = ("impl", "batch", "steps/canvas", "decode tok/s", "e2e tok/s", "ms/step", "tok/fwd", "peak MiB",
              "roofline")
    rows = [header]
    for r in result["runs"]:
        steps = r["steps_per_canvas"]
        rows.append((
            r["impl"], str(r["batch"]),
            "-" if not steps else (str(steps[0]) if len(set(steps)) == 1 else "/".join(map(str, steps))),
            f"{r['decode_tokens_per_s']:.1f}", f"{r['end_to_end_tokens_per_s']:.1f}", f"{r['ms_per_step']:.1f}",
            f"{r['tokens_per_forward']:.2f}", _fmt(r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2**20, ".0f"),
            _fmt(r["roofline_fraction"], ".1%"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    lines.append("peak MiB: " + ("CUDA max allocated, weights included" if result["device"].startswith("cuda")
                                 else "growth of the resident set during the run"))
    for ratio in result["ratios"]:
        lines.append(f"batch {ratio['batch']}: {ratio['impl']} / {ratio['against']} = {ratio['decode']:.2f}x decode, "
                     f"{ratio['end_to_end']:.2f}x end to end")
    ours = {r["batch"]: r for r in result["runs"] if r["impl"] == "ours"}
    if 1 in ours and len(ours) > 1:
        lines.append("ours, throughput over batch 1: " + ", ".join(
            f"batch {b} {r['decode_tokens_per_s'] / ours[1]['decode_tokens_per_s']:.2f}x"
            for b, r in sorted(ours.items()) if b != 1))
    return "\n".join(lines)


def write_png(result: dict, path: str | Path) -> Path:
    """A bar chart of decode and end-to-end tokens/s per implementation and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = [i for i in IMPLS if any(r["impl"] == i for r in result["runs"])]
    batches = result["batches"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(len(impls), 1)
    for ax, key, title in zip(axes, ("decode_tokens_per_s", "end_to_end_tokens_per_s"), ("decode", "end to end")):
        for k, impl in enumerate(impls):
            values = {r["batch"]: r[key] for r in result["runs"] if r["impl"] == impl}
            xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(batches))]
            ax.bar(xs, [values.get(b, 0.0) for b in batches], width, label=impl)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title} tokens/s")
        ax.legend()
    fig.suptitle(f"{result['model']} on {result['device']} ({result['dtype']}, {result['mode']} "
                 f"{result['max_denoising_steps']} steps)")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return Path(path)


def add_arguments(p) -> None:
    """The `dgemma bench` options (shared by the command line and its help)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", choices=PRESET_NAMES, default=None,
                     help="random weights of a named shape (default: small)")
    src.add_argument("--model", default=None, help="checkpoint directory or Hub repo id instead of a shape")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default: 1)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row (default: 64)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default: one canvas)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps per canvas (default: {DEFAULT_FIXED_STEPS}; with --adaptive: at most, "
                        "default the checkpoint's)")
    p.add_argument("--adaptive", action="store_true", help="let canvases stop early (the stability/confidence rule)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or meta (weight bytes only; default: cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: float32 on cpu, bfloat16 elsewhere; a checkpoint's stored dtype)")
    p.add_argument("--repeat", type=int, default=1, help="measured runs; the median is reported (default: 1)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs of 2 steps per canvas (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="extend", nargs="+", choices=["reference", "ar"], default=[],
                   help="also run transformers' implementation and/or autoregressive decoding")
    p.add_argument("--reference-experts", choices=["eager", "grouped_mm", "batched_mm"], default=None,
                   help="transformers' experts_implementation for --compare reference (default: its own)")
    p.add_argument("--quant", action="extend", nargs="+", choices=list(QUANT_KINDS), default=[],
                   help="also run these weight-only formats, quantized in memory from the same weights")
    p.add_argument("--group-size", type=int, choices=list(INT4_GROUP_SIZES), default=64,
                   help="int4 group size for --quant (default: 64)")
    p.add_argument("--interleave", action="store_true",
                   help="alternate the measured runs between implementations (fairer on a noisy machine; keeps every "
                        "--quant format in memory at once)")
    p.add_argument("--json-out", default=None, help="write the results as JSON to this path")
    p.add_argument("--png", default=None, help="write a bar chart to this path")
    p.add_argument("--force", action="store_true", help="run 26b-a4b on the CPU anyway")


def cmd_bench(args) -> int:
    opts = BenchOptions(
        shape=args.shape or "small", model=args.model, batches=tuple(args.batch), prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, steps=args.steps, adaptive=args.adaptive, device=args.device, dtype=args.dtype,
        repeat=args.repeat, warmup=args.warmup, seed=args.seed, compare=tuple(dict.fromkeys(args.compare)),
        reference_experts=args.reference_experts, force=args.force, quant=tuple(dict.fromkeys(args.quant)),
        group_size=args.group_size, interleave=args.interleave,
    )
    result = run_bench(opts, log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json_out:
        write_atomic(args.json_out, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    if args.png:
        write_png(result, args.png)
    return 0
