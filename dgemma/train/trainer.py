"""`dgemma train CONFIG`: the training loop, its configuration, checkpoints and resumption.

Owns: the TOML/YAML config (validated: unknown keys are errors) with `--set key=value` overrides; building or
loading the model and tokenizer (training a BPE tokenizer for from-scratch models); AdamW with linear warmup and
cosine decay, gradient accumulation, clipping and optional bf16 autocast; the training device (a CUDA GPU per rank
when there is one); data parallelism across processes started by torchrun (each rank takes its rows of the global
batch and gradients are summed, so the loss equals one process's), either with whole replicas and one flat
all-reduce ("ddp") or with FSDP2 sharding ("fsdp": every layer's parameters, gradients and optimizer state split
across ranks); periodic held-out loss; a progress bar; atomic checkpoints (a new directory per save plus an
atomically replaced `latest` pointer, optimizer state keyed by parameter name) that `--resume` continues exactly;
and a loss-curve PNG.
Must not: define the loss (objective.py) or the data order (data.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from .. import checkpoint
from ..config import GenerationSettings, preset
from ..model.diffusion_gemma import DiffusionGemma
from ..tokenizer import Tokenizer
from .data import ChatData, Shape, TextData, expand_globs, stream_seed
from . import lora
from .lora import LoRAConfig
from .objective import ObjectiveOptions, losses, token_counts


@dataclass
class ModelSection:
    preset: str | None = None  # a named shape for a from-scratch model ...
    checkpoint: str | None = None  # ... or a checkpoint directory to fine-tune
    overrides: dict = field(default_factory=dict)  # text_config fields for the preset (e.g. num_hidden_layers)
    canvas_length: int | None = None  # preset only
    init_std: float = 0.02


@dataclass
class TokenizerSection:
    train: bool = False  # train a byte-level BPE on the training files (from-scratch models)
    vocab_size: int = 4096
    path: str | None = None  # a directory holding tokenizer.json (default: the checkpoint's, or byte-level)


@dataclass
class DataSection:
    kind: str = "text"  # "text" (files, packed) or "chat" (JSONL with messages)
    train: list = field(default_factory=list)  # globs
    heldout: list = field(default_factory=list)  # globs; empty = no held-out loss
    skip_bad_lines: bool = False
    line_aligned: float = 0.0  # text: probability that a row's first block starts a line (see TextData)


@dataclass
class TrainSection:
    out: str = "runs/train"
    steps: int = 100
    batch_size: int = 8  # global rows per optimiser step, per micro-batch
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    clip: float = 1.0
    blocks: int = 1  # supervised canvases per sequence
    min_prefix: int = 1
    max_prefix: int = 128
    seed: int = 0
    bf16: bool = False  # autocast matmuls to bfloat16
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    keep: int = 2  # checkpoints kept
    log_every: int = 10  # a log line every N steps when stderr is not a terminal
    freeze_router: bool = False
    threads: int = 0  # torch CPU threads (0 = default)
    device: str = "auto"  # "auto": this rank's CUDA GPU when there is one, else "cpu"; or "cpu" / "cuda"
    parallel: str = "ddp"  # with several processes: "ddp" (whole replicas) or "fsdp" (FSDP2 sharding)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kinds = {"model": ModelSection, "tokenizer": TokenizerSection, "data": DataSection,
                 "train": TrainSection, "objective": ObjectiveOptions, "lora": LoRAConfig}
        values = {}
        for name, body in raw.items():
            if name not in sections:
                raise ValueError(f"unknown config section [{name}]; known: {', '.join(sections)}")
            if not isinstance(body, dict):
                raise ValueError(f"config section [{name}] must be a table")
            known = {f.name for f in dataclasses.fields(kinds[name])}
            for key in body:
                if key not in known:
                    raise ValueError(f"unknown config key {name}.{key}; known: {', '.join(sorted(known))}")
            if name == "lora" and "targets" in body:
                body = {**body, "targets": tuple(body["targets"])}
            values[name] = kinds[name](**body)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        t = self.train
        for key in ("steps", "batch_size", "grad_accum", "blocks", "eval_batches", "keep", "log_every",
                    "eval_every", "save_every"):
            if getattr(t, key) < 1:
                raise ValueError(f"train.{key} must be >= 1")
        if not 0 <= t.min_prefix <= t.max_prefix:
            raise ValueError("train.min_prefix must be between 0 and train.max_prefix")
        if t.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {t.device!r}")
        if t.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel must be 'ddp' or 'fsdp', got {t.parallel!r}")
        if self.data.kind not in ("text", "chat"):
            raise ValueError(f"data.kind must be 'text' or 'chat', got {self.data.kind!r}")
        if not 0.0 <= self.data.line_aligned <= 1.0:
            raise ValueError(f"data.line_aligned is a probability in [0, 1], got {self.data.line_aligned!r}")
        if self.data.line_aligned > 0 and self.data.kind != "text":
            raise ValueError("data.line_aligned applies to text data (chat blocks start at the reply)")
        if not self.data.train:
            raise ValueError("data.train must list at least one glob")
        if (self.model.preset is None) == (self.model.checkpoint is None):
            raise ValueError("set exactly one of model.preset and model.checkpoint")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_changes(saved: dict, current: dict) -> list[str]:
    """"section.key: old -> new" for each setting of `current` (a `TrainConfig.to_dict()`) that differs from
    `saved` (one as a checkpoint stored it in JSON); a key the checkpoint lacks counts as changed from None."""
    current = json.loads(json.dumps(current))  # tuples become lists, as in the saved form
    return [f"{name}.{key}: {json.dumps(saved.get(name, {}).get(key))} -> {json.dumps(value)}"
            for name, body in current.items() for key, value in body.items()
            if saved.get(name, {}).get(key) != value]


def read_config(path: str | os.PathLike, overrides: list[str] = ()) -> TrainConfig:
    """Parse a TOML (or YAML) config file, then apply `key.sub=value` overrides (values parsed as TOML)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no config file at {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: {err}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = parsed
    return TrainConfig.from_dict(raw)


# ---- distribution ----------------------------------------------------------------------------------------------
def _device(setting: str) -> torch.device:
    """The training device: with "auto" (or "cuda"), GPU LOCAL_RANK when CUDA is available."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA GPU is available")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _world(device: torch.device) -> tuple[int, int]:
    if "RANK" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(net: DiffusionGemma, device: torch.device, world: int) -> None:
    """FSDP2: each layer one unit (it runs in the encoder and the decoder passes), the rest one root unit. Gradients
    are summed, not averaged (the loss is already a global mean), and parameters a rank did not use this step (an
    unsampled self-conditioning path) are reduced as zeros, so every rank runs the same collectives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if not hasattr(FSDPModule, "set_reduce_scatter_unused_params"):
        raise RuntimeError(f"train.parallel = 'fsdp' needs a newer PyTorch than {torch.__version__} "
                           "(FSDPModule.set_reduce_scatter_unused_params)")
    mesh = init_device_mesh(device.type, (world,))
    for layer in net.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    for method in ("encode", "decode", "head"):  # the objective calls these, never forward()
        register_fsdp_forward_method(net, method)
    for module in [*net.layers, net]:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied sum)
    net.set_reduce_scatter_unused_params(True)


def _rows(global_rows: int, rank: int, world: int) -> range:
    if global_rows % world:
        raise ValueError(f"train.batch_size {global_rows} is not divisible by {world} processes")
    per = global_rows // world
    return range(rank * per, (rank + 1) * per)


def prune_checkpoints(out: Path, keep: int) -> None:
    """Remove all but the `keep` highest-numbered step-N directories under `out` (by number: step-1000000 comes
    after step-999000, though not as text)."""
    steps = sorted((p for p in out.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    for p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


# ---- the run ---------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print):
        self.cfg, self.log = cfg, log
        t = cfg.train
        self.device = _device(t.device)
        self.rank, self.world = _world(self.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.out = Path(t.out)
        self.history: dict[str, list] = {"step": [], "loss": [], "diffusion": [], "ar": [], "eval_step": [],
                                          "eval_loss": []}
        self.start_step = 0
        state = None
        if resume:
            latest = self._latest()
            if latest is None:
                raise ValueError(f"--resume: no checkpoint under {self.out}")
            state = self._load_state(latest)
        elif any(p.is_dir() for p in self.out.glob("step-*")):  # a fresh run would prune that run's checkpoints
            raise ValueError(f"{self.out} already holds checkpoints of a run: pass --resume to continue it, or set "
                             "another train.out")
        self.tokenizer, self.net = self._build(state)
        self.sharded = t.parallel == "fsdp" and self.world > 1
        if self.sharded:
            _shard(self.net, self.device, self.world)  # moves each unit to the device as it shards it
        else:
            self.net.to(self.device)
        c = self.net.config.canvas_length
        width = t.max_prefix + t.blocks * c
        if c < 1 or width > self.net.config.max_position_embeddings:
            raise ValueError(f"canvas length {c} with max_prefix {t.max_prefix} and {t.blocks} blocks needs "
                             f"{width} positions; the model takes {self.net.config.max_position_embeddings}")
        self.shape = Shape(c, t.blocks, t.min_prefix, t.max_prefix)
        data_cls = TextData if cfg.data.kind == "text" else ChatData
        kwargs = {"line_aligned": cfg.data.line_aligned} if cfg.data.kind == "text" \
            else {"skip_bad_lines": cfg.data.skip_bad_lines}
        self.train_data = data_cls(expand_globs(cfg.data.train, "data.train"), self.tokenizer, **kwargs)
        self.eval_data = data_cls(expand_globs(cfg.data.heldout, "data.heldout"), self.tokenizer, **kwargs,
                                  name="held-out") if cfg.data.heldout else None
        for data in (self.train_data, self.eval_data):
            if isinstance(data, TextData):  # now, not at the first batch or evaluation, which may be far into the run
                data.check_width(width)
            elif data is not None and (cut := sum(len(p) > t.max_prefix for p, _ in data.examples)):
                self.log(f"{cut} of {len(data)} {data.name} prompts are longer than train.max_prefix = "
                         f"{t.max_prefix} tokens: they keep their first token and their last ones")
        self.log(f"data: {len(self.train_data):,} training {'tokens' if cfg.data.kind == 'text' else 'examples'}"
                 f"; model: {sum(p.numel() for p in self.net.parameters()):,} parameters")
        params = [p for p in self.net.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=tuple(t.betas))
        if state is not None:
            self._restore_optimizer(state)
        self.line_start = torch.tensor(self.tokenizer.line_starts(self.net.config.vocab_size)) \
            if cfg.objective.lines > 0 else None

    # -- model ----------------------------------------------------------------------------------------------------
    def _build(self, state):
        """(tokenizer, network). On resume, full fine-tuning reloads our own checkpoint; a LoRA run rebuilds its
        base exactly as at the start and loads the saved adapters onto it."""
        cfg = self.cfg
        use_lora = cfg.lora.rank > 0
        if state is not None and not use_lora:
            path = state["path"]
            cfg_model, _ = checkpoint.read_config(path)
            net = checkpoint.load_weights(path, cfg_model, torch.float32, torch.device("cpu"))
            tokenizer = Tokenizer.from_dir(path)
        elif cfg.model.checkpoint:
            path = checkpoint.resolve(cfg.model.checkpoint)
            cfg_model, _ = checkpoint.read_config(path)
            net = checkpoint.load_weights(path, cfg_model, torch.float32, torch.device("cpu"))
            tokenizer = Tokenizer.from_dir(Path(cfg.tokenizer.path or path)) or Tokenizer.byte_level()
        else:
            tokenizer = Tokenizer.from_dir(state["path"]) if state is not None else self._tokenizer()
            overrides = dict(cfg.model.overrides)
            overrides.setdefault("vocab_size", -(-tokenizer.vocab_size // 64) * 64)
            if cfg.model.canvas_length is not None:
                overrides["canvas_length"] = cfg.model.canvas_length
            net = DiffusionGemma(preset(cfg.model.preset, **overrides)).init_weights(cfg.train.seed,
                                                                                     cfg.model.init_std)
        if net.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {net.config.vocab_size}")
        if not use_lora:
            net.requires_grad_(True)
        elif state is not None:
            saved = lora.load_adapters(net, state["path"])
            if saved != cfg.lora:  # the adapters were trained at their own scale; saving would merge at another one
                raise ValueError(f"--resume: the checkpoint's adapters have {saved}, the config {cfg.lora}; a LoRA "
                                 "run resumes with the settings it started with")
        else:
            lora.apply(net, cfg.lora, cfg.train.seed)
        if cfg.train.freeze_router:
            for layer in net.layers:
                layer.router.requires_grad_(False)
        return tokenizer, net.train()

    def _tokenizer(self) -> Tokenizer:
        tc = self.cfg.tokenizer
        if tc.path:
            tok = Tokenizer.from_dir(tc.path)
            if tok is None:
                raise ValueError(f"tokenizer.path {tc.path}: no tokenizer.json")
            return tok
        if not tc.train:
            return Tokenizer.byte_level()
        files = expand_globs(self.cfg.data.train, "data.train")
        self.log(f"training a {tc.vocab_size}-id BPE tokenizer on {len(files)} files")
        return Tokenizer.train_bpe((f.read_text(encoding="utf-8", errors="replace") for f in files), tc.vocab_size)

    # -- schedule -------------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        t = self.cfg.train
        if step < t.warmup:
            return t.lr * (step + 1) / t.warmup
        progress = (step - t.warmup) / max(1, t.steps - t.warmup)
        return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    # -- one step -------------------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16)

    def step(self, step: int) -> dict[str, float]:
        t, seed = self.cfg.train, self.cfg.train.seed
        rows = _rows(t.batch_size, self.rank, self.world)
        batches = [self.train_data.batch(self.shape, seed, step, m, rows).to(self.device) for m in range(t.grad_accum)]
        counts = {"diffusion": 0.0, "ar": 0.0}
        for b in batches:
            for k, v in token_counts(b, self.shape.canvas_length).items():
                counts[k] += v
        if self.world > 1:
            totals = torch.tensor([counts["diffusion"], counts["ar"]], dtype=torch.float64, device=self.device)
            dist.all_reduce(totals)
            counts = {"diffusion": float(totals[0]), "ar": float(totals[1])}
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        logged = {"loss": 0.0, "diffusion": 0.0, "ar": 0.0}
        self_conditioned = 0.0
        for m, b in enumerate(batches):
            if self.sharded:  # reduce-scatter the gradients once, after the last micro-batch
                self.net.set_requires_gradient_sync(m == len(batches) - 1)
            gens = [torch.Generator().manual_seed(stream_seed(seed, step, m, r, 1)) for r in rows]
            with self._autocast():
                out = losses(self.net, b, self.cfg.objective, gens, normaliser=counts,
                             balance_scale=1.0 / (t.grad_accum * self.world), uniform_passes=self.sharded,
                             line_start=self.line_start)
            out["loss"].backward()
            for k in logged:
                logged[k] += float(out[k].detach())
            self_conditioned += float(out["self_conditioned"])
        if self.world > 1 and not self.sharded:  # one flat all-reduce; a parameter unused on a rank contributes zeros
            params = [p for p in self.net.parameters() if p.requires_grad]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            dist.all_reduce(flat)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad = g.view_as(p).clone()
        if self.world > 1:
            sums = torch.tensor([logged["loss"], logged["diffusion"], logged["ar"], self_conditioned],
                                dtype=torch.float64, device=self.device)
            dist.all_reduce(sums)
            *totals, self_conditioned = sums.tolist()
            logged = dict(zip(("loss", "diffusion", "ar"), totals))
        if not self_conditioned:  # no rank read it: no gradient, as in one process (a zero one would still decay)
            for p in self.net.self_conditioning.parameters():
                p.grad = None
        if t.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), t.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return logged

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss over fixed batches (the same every time)."""
        t = self.cfg.train
        rows = range(t.batch_size)
        total = 0.0
        self.net.eval()
        for i in range(t.eval_batches):
            b = self.eval_data.batch(self.shape, 1_234_567, i, 0, rows).to(self.device)
            with self._autocast():
                gens = [torch.Generator().manual_seed(stream_seed(i, r)) for r in rows]
                total += float(losses(self.net, b, self.cfg.objective, gens, line_start=self.line_start)["loss"])
        self.net.train()
        return total / t.eval_batches

    # -- loop -----------------------------------------------------------------------------------------------------
    def run(self) -> Path | None:
        t = self.cfg.train
        tokens_per_step = t.batch_size * t.grad_accum * (t.max_prefix + t.min_prefix + 2 * t.blocks
                                                         * self.shape.canvas_length) / 2
        bar = None
        if self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True,
                       disable=None)
        last_save = None
        started = time.perf_counter()
        for step in range(self.start_step, t.steps):
            logged = self.step(step)
            h = self.history
            h["step"].append(step)
            for k in ("loss", "diffusion", "ar"):
                h[k].append(logged[k])
            done = step + 1
            if self.eval_data is not None and (done % t.eval_every == 0 or done == t.steps):
                h["eval_step"].append(step)
                h["eval_loss"].append(self.evaluate())
            if bar is not None:
                rate = (done - self.start_step) * tokens_per_step / (time.perf_counter() - started)
                post = {"loss": f"{logged['loss']:.3f}", "tok/s": f"{rate:,.0f}"}
                if h["eval_loss"]:
                    post["eval"] = f"{h['eval_loss'][-1]:.3f}"
                bar.set_postfix(post)
                bar.update(1)
                if bar.disable and (done % t.log_every == 0 or done == t.steps):  # no terminal: plain lines
                    self.log(f"step {done}/{t.steps} " + " ".join(f"{k} {v}" for k, v in post.items()))
            if done % t.save_every == 0 or done == t.steps:
                last_save = self.save(done)
        if bar is not None:
            bar.close()
        return last_save

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _latest(self) -> Path | None:
        pointer = self.out / "latest"
        if not pointer.is_file():
            return None
        path = self.out / pointer.read_text().strip()
        return path if path.is_dir() else None

    def _full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(model weights, optimizer tensors as "PARAM_NAME.KEY"), whole and on the CPU. Gathering shards is
        collective: every rank calls this; under FSDP only rank 0 receives the tensors."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.net, options=opts)
        optim = get_optimizer_state_dict(self.net, self.opt, options=opts)
        tensors = {f"{name}.{k}": v for name, entry in optim.get("state", {}).items() for k, v in entry.items()
                   if isinstance(v, torch.Tensor)}
        return weights, tensors

    def _plain_net(self, weights: dict[str, torch.Tensor]) -> DiffusionGemma:
        """A CPU, undistributed network holding `weights`; a LoRA run's adapters merged into their bases."""
        with torch.device("meta"):
            net = DiffusionGemma(self.net.config)
            if self.cfg.lora.rank > 0:
                lora.apply(net, self.cfg.lora)
        net.load_state_dict(weights, assign=True)
        return lora.merge(net) if self.cfg.lora.rank > 0 else net

    def save(self, step: int) -> Path | None:
        """Write out/step-NNNNNN atomically, then point out/latest at it; keep the newest `keep`."""
        weights, state = self._full_state()
        if self.rank != 0:
            if self.world > 1:
                dist.barrier()
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:06d}"
        target = self.out / name
        use_lora = self.cfg.lora.rank > 0
        meta = {"step": step, "config": self.cfg.to_dict(), "history": self.history}

        def write_state(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "trainer_state.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps(meta))
            if use_lora:
                adapters = {k: v.contiguous() for k, v in weights.items() if ".lora_" in k}
                lora.save_adapters(adapters, self.cfg.lora, tmp)

        # A LoRA run saves a standard checkpoint with the adapters merged, plus the adapters on their own.
        checkpoint.save(self._plain_net(weights), GenerationSettings(), target, tokenizer=self.tokenizer,
                        extra=write_state, replace=True)  # a resumed run may save a step it saved before
        # On disk before older checkpoints are pruned: a power loss leaves `latest` naming a whole checkpoint.
        checkpoint.write_atomic(self.out / "latest", lambda tmp: tmp.write_text(name))
        prune_checkpoints(self.out, self.cfg.train.keep)
        self._plot()
        if self.world > 1:
            dist.barrier()
        return target

    def _load_state(self, path: Path) -> dict:
        meta = json.loads((path / "trainer_state.json").read_text())
        self.start_step = meta["step"]
        self.history = meta["history"]
        changes = config_changes(meta["config"], self.cfg.to_dict())
        if changes and self.rank == 0:
            self.log(f"resuming {path.name} with settings changed since it was saved: {'; '.join(changes)}")
        return {"path": path, "tensors": load_file(str(path / "trainer_state.safetensors"))}

    def _restore_optimizer(self, state: dict) -> None:
        """Load the saved optimizer tensors ("PARAM_NAME.KEY"; older checkpoints: "INDEX.KEY", the parameter's
        place in the optimizer), sharding them as the parameters are. Parameters that never had a gradient have no
        saved state and start fresh, as they would have."""
        saved: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state["tensors"].items():
            name, _, field_name = key.rpartition(".")
            saved.setdefault(name, {})[field_name] = value
        if saved and all(name.isdigit() for name in saved):
            names = {p: n for n, p in self.net.named_parameters()}
            order = [names[p] for g in self.opt.param_groups for p in g["params"]]
            saved = {order[int(i)]: entry for i, entry in saved.items()}
        opts = StateDictOptions(full_state_dict=True, strict=False)
        groups = get_optimizer_state_dict(self.net, self.opt, options=opts)["param_groups"]
        set_optimizer_state_dict(self.net, self.opt, {"state": saved, "param_groups": groups}, options=opts)

    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        h = self.history
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(h["step"], h["loss"], label="train loss", alpha=0.6)
        ax.plot(h["step"], h["diffusion"], label="diffusion", alpha=0.6)
        ax.plot(h["step"], h["ar"], label="encoder next-token", alpha=0.6)
        if h["eval_step"]:
            ax.plot(h["eval_step"], h["eval_loss"], "o-", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        checkpoint.write_atomic(self.out / "loss.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point for `dgemma train` and `python -m dgemma.train` (also under torchrun)."""
    import argparse

    parser = argparse.ArgumentParser(prog="dgemma train", description="Train or fine-tune a DiffusionGemma model.")
    parser.add_argument("config", help="TOML or YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=200")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out")
    args = parser.parse_args(argv)
    try:
        cfg = read_config(args.config, args.set)
        trainer = Trainer(cfg, resume=args.resume, log=lambda m: print(m, file=sys.stderr))
        path = trainer.run()
    except ValueError as err:
        print(f"dgemma train: error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if path is not None:
        print(f"saved {path}")
    return 0
