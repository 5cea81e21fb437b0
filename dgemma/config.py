"""Model and generation configuration.

Owns: `ModelConfig` (the text model's shapes, parsed from a checkpoint's config.json in either official form:
`global_head_dim`/`num_global_key_value_heads`, or `per_layer_config`) and `GenerationSettings` (the sampler's
defaults from generation_config.json, overridable per call). Both validate their values and name the problem.
Must not: touch tensors, files other than the JSON dicts handed in, or the network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"

_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass(frozen=True)
class RopeConfig:
    kind: str  # "default" or "proportional"
    theta: float
    partial_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the DiffusionGemma text model. Per-layer lists have one entry per layer."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense gated MLP (and the self-conditioning MLP)
    num_attention_heads: int
    layer_types: tuple[str, ...]
    layer_head_dims: tuple[int, ...]
    layer_kv_heads: tuple[int, ...]
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    sliding_window: int
    rope: dict = field(default_factory=dict)  # layer type -> RopeConfig
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 262_144
    canvas_length: int = 256
    pad_token_id: int = 0
    bos_token_id: int | None = 2
    eos_token_ids: tuple[int, ...] = (1,)
    hidden_activation: str = "gelu_pytorch_tanh"

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    def __post_init__(self):
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_experts",
            "top_k_experts", "moe_intermediate_size", "sliding_window", "canvas_length", "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.sliding_window < 2:  # sliding caches keep sliding_window - 1 slots; the reference mis-trims at 1
            raise ValueError(f"config: sliding_window must be at least 2, got {self.sliding_window}")
        n = len(self.layer_types)
        if n == 0:
            raise ValueError("config: the model needs at least one layer")
        if len(self.layer_head_dims) != n or len(self.layer_kv_heads) != n:
            raise ValueError("config: per-layer head dims / kv heads do not match the number of layers")
        for i, kind in enumerate(self.layer_types):
            if kind not in (SLIDING, FULL):
                raise ValueError(f"config: layer {i} has unknown layer type {kind!r}")
            if self.num_attention_heads % self.layer_kv_heads[i]:
                raise ValueError(
                    f"config: layer {i}: {self.num_attention_heads} attention heads are not a multiple of "
                    f"{self.layer_kv_heads[i]} key/value heads"
                )
            if self.layer_head_dims[i] % 2:
                raise ValueError(f"config: layer {i}: head_dim {self.layer_head_dims[i]} must be even for RoPE")
        if self.top_k_experts > self.num_experts:
            raise ValueError(f"config: top_k_experts {self.top_k_experts} exceeds num_experts {self.num_experts}")
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"config: unsupported hidden_activation {self.hidden_activation!r}")
        for kind in set(self.layer_types):
            if kind not in self.rope:
                raise ValueError(f"config: no rope parameters for layer type {kind!r}")
            if self.rope[kind].kind not in ("default", "proportional"):
                raise ValueError(f"config: unsupported rope_type {self.rope[kind].kind!r} for {kind}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"config: pad_token_id {self.pad_token_id} is outside the vocabulary")

    # ---- parameter counts -------------------------------------------------------------------------------------
    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token) parameters, counting the tied embedding once (it is also the head)."""
        h, inter, moe = self.hidden_size, self.intermediate_size, self.moe_intermediate_size
        total = active = self.vocab_size * h + h  # embedding (= head) + final norm
        sc = 3 * h * inter + h  # self-conditioning MLP + its pre-norm
        total += sc
        active += sc
        for i in range(self.num_hidden_layers):
            d, kv = self.layer_head_dims[i], self.layer_kv_heads[i]
            attn = h * self.num_attention_heads * d * 2 + h * kv * d * (2 if self.layer_types[i] == SLIDING else 1)
            attn += 2 * d  # q_norm, k_norm
            dense = 3 * h * inter
            norms = 7 * h
            router = h * self.num_experts + h + self.num_experts
            expert = 3 * h * moe
            total += attn + dense + norms + router + self.num_experts * expert
            active += attn + dense + norms + router + self.top_k_experts * expert
        return total, active

    # ---- (de)serialisation ------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Parse a transformers-style config.json dict (model_type "diffusion_gemma")."""
        if not isinstance(data, dict):
            raise ValueError("config.json must hold a JSON object")
        model_type = data.get("model_type")
        if model_type != "diffusion_gemma":
            raise ValueError(f"config.json: model_type is {model_type!r}, expected 'diffusion_gemma'")
        text = data.get("text_config")
        if not isinstance(text, dict):
            raise ValueError("config.json: missing 'text_config' object")
        try:
            return cls._from_text_dict(text, canvas_length=data.get("canvas_length") or 256)
        except KeyError as err:
            raise ValueError(f"config.json: text_config is missing {err.args[0]!r}") from None

    @classmethod
    def _from_text_dict(cls, text: dict[str, Any], canvas_length: int) -> ModelConfig:
        if text.get("use_bidirectional_attention") == "all":
            raise ValueError("config.json: use_bidirectional_attention='all' (non-causal encoder) is not supported")
        if text.get("attention_bias"):
            raise ValueError("config.json: attention_bias=true is not supported by DiffusionGemma")
        n_layers = text["num_hidden_layers"]
        layer_types = text.get("layer_types") or [
            SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)
        ]
        layer_types = list(layer_types)
        if len(layer_types) != n_layers:
            raise ValueError(f"config.json: {len(layer_types)} layer_types for {n_layers} layers")
        layer_types[-1] = FULL  # the reference forces the last layer to full attention
        head_dims = [text.get("head_dim", 256)] * n_layers
        kv_heads = [text["num_key_value_heads"]] * n_layers
        per_layer = text.get("per_layer_config")
        if per_layer is not None:
            for key, override in per_layer.items():
                idx = int(key)
                if not 0 <= idx < n_layers:
                    raise ValueError(f"config.json: per_layer_config names layer {idx} of {n_layers}")
                head_dims[idx] = override.get("head_dim", head_dims[idx])
                kv_heads[idx] = override.get("num_key_value_heads", kv_heads[idx])
        else:
            global_dim = text.get("global_head_dim") or 512
            global_kv = text.get("num_global_key_value_heads")
            for i, kind in enumerate(layer_types):
                if kind == FULL:
                    head_dims[i] = global_dim
                    if global_kv is not None:
                        kv_heads[i] = global_kv
        rope_params = text.get("rope_parameters") or _DEFAULT_ROPE
        rope = {}
        for kind in set(layer_types):
            p = rope_params.get(kind) or _DEFAULT_ROPE[kind]
            rope[kind] = RopeConfig(
                kind=p.get("rope_type", "default"),
                theta=float(p.get("rope_theta", _DEFAULT_ROPE[kind]["rope_theta"])),
                partial_factor=float(p.get("partial_rotary_factor", 1.0)),
                factor=float(p.get("factor", 1.0)),
            )
        eos = text.get("eos_token_id", 1)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_attention_heads=text["num_attention_heads"],
            layer_types=tuple(layer_types),
            layer_head_dims=tuple(head_dims),
            layer_kv_heads=tuple(kv_heads),
            num_experts=text["num_experts"],
            top_k_experts=text["top_k_experts"],
            moe_intermediate_size=text["moe_intermediate_size"],
            sliding_window=text.get("sliding_window", 512),
            rope=rope,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=text.get("final_logit_softcapping", 30.0),
            max_position_embeddings=text.get("max_position_embeddings", 262_144),
            canvas_length=canvas_length,
            pad_token_id=text.get("pad_token_id", 0) if text.get("pad_token_id") is not None else 0,
            bos_token_id=text.get("bos_token_id", 2),
            eos_token_ids=tuple(eos),
            hidden_activation=text.get("hidden_activation", "gelu_pytorch_tanh"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that this module and transformers' DiffusionGemmaConfig both read back."""
        base_dim, base_kv = self.layer_head_dims[0], self.layer_kv_heads[0]
        for i, kind in enumerate(self.layer_types):
            if kind == SLIDING:
                base_dim, base_kv = self.layer_head_dims[i], self.layer_kv_heads[i]
                break
        per_layer = {
            str(i): {"head_dim": self.layer_head_dims[i], "num_key_value_heads": self.layer_kv_heads[i]}
            for i in range(self.num_hidden_layers)
            if (self.layer_head_dims[i], self.layer_kv_heads[i]) != (base_dim, base_kv)
        }
        rope = {}
        for kind, r in self.rope.items():
            p = {"rope_type": r.kind, "rope_theta": r.theta}
            if r.partial_factor != 1.0:
                p["partial_rotary_factor"] = r.partial_factor
            if r.factor != 1.0:
                p["factor"] = r.factor
            rope[kind] = p
        text = {
            "model_type": "diffusion_gemma_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": base_kv,
            "head_dim": base_dim,
            "per_layer_config": per_layer,
            "layer_types": list(self.layer_types),
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "sliding_window": self.sliding_window,
            "rope_parameters": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "final_logit_softcapping": self.final_logit_softcapping,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": self.hidden_activation,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "tie_word_embeddings": True,
            "use_bidirectional_attention": "vision",
        }
        return {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": "diffusion_gemma",
            "canvas_length": self.canvas_length,
            "tie_word_embeddings": True,
            "text_config": text,
        }


_PRESETS = {
    # The released google/diffusiongemma-26B-A4B-it text shapes.
    "26b-a4b": dict(
        canvas_length=256, vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
        num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2, head_dim=256,
        global_head_dim=512, sliding_window=1024, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
        eos_token_id=[1, 106, 50],
    ),
    # A laptop-sized model of the same architecture (benchmarks, from-scratch training).
    "small": dict(
        canvas_length=256, vocab_size=32_768, hidden_size=512, intermediate_size=1024, num_hidden_layers=12,
        num_attention_heads=8, num_key_value_heads=4, num_global_key_value_heads=2, head_dim=64, global_head_dim=128,
        sliding_window=512, num_experts=32, top_k_experts=4, moe_intermediate_size=256, max_position_embeddings=32_768,
    ),
    # The smallest shape that still has every feature: sliding and full layers, GQA, MoE.
    "tiny": dict(
        canvas_length=32, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1, head_dim=16, global_head_dim=32,
        sliding_window=64, num_experts=8, top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=4096,
        layer_types=[SLIDING, SLIDING, SLIDING, FULL],
    ),
}
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str, **overrides) -> ModelConfig:
    """A named shape ("26b-a4b", "small", "tiny"), with optional text_config overrides."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    text = {**_PRESETS[name], **overrides}
    canvas = text.pop("canvas_length")
    return ModelConfig.from_hf_dict({"model_type": "diffusion_gemma", "canvas_length": canvas, "text_config": text})


_FLOAT32_MAX = 3.4028234663852886e38  # the sampler computes in float32: anything larger would be infinite there
_MIN_T_MAX = 1e-6  # below it the temperatures of a long schedule are not normal float32 numbers: logits / t overflow


@dataclass(frozen=True)
class GenerationSettings:
    """Sampler settings; defaults are the released generation_config.json values."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005

    def __post_init__(self):
        for name in ("max_new_tokens", "max_denoising_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.stability_threshold, bool) or not isinstance(self.stability_threshold, int) \
                or self.stability_threshold < 0:
            raise ValueError(f"stability_threshold must be an integer >= 0, got {self.stability_threshold!r}")
        for name in ("entropy_bound", "confidence_threshold", "t_min", "t_max"):
            value = getattr(self, name)
            zero_ok = name == "t_min"  # t_max > 0 keeps every step's temperature t_min + (t_max - t_min) n / N > 0
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= _FLOAT32_MAX \
                    or (value == 0 and not zero_ok):  # `not 0 <= value`: NaN too
                raise ValueError(f"{name} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value!r}")
        if self.t_max < _MIN_T_MAX:
            raise ValueError(f"t_max must be at least {_MIN_T_MAX} (a small one samples almost greedily), "
                             f"got {self.t_max!r}")
        if self.t_max < self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be >= t_min ({self.t_min})")

    def replace(self, **overrides) -> GenerationSettings:
        """A copy with every override that is not None applied."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> GenerationSettings:
        """Read generation_config.json; a null or absent field keeps the released default."""
        values = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        sampler = data.get("sampler_config")
        if isinstance(sampler, dict) and values["entropy_bound"] is None:
            values["entropy_bound"] = sampler.get("entropy_bound")
        return cls().replace(**values)

    def to_hf_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sampler_config"] = {"entropy_bound": out.pop("entropy_bound"), "_cls_name": "EntropyBoundSamplerConfig"}
        return out
