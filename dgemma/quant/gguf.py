"""GGUF files (llama.cpp's single-file format): the container read by `gguf_reader`, the blocks decoded or
repacked with the `gguf` package's types and decoders (`pip install dgemma[gguf]`).

llama.cpp has no DiffusionGemma architecture, so dgemma defines one, following its `gemma4` conventions:

    general.architecture = "diffusion_gemma"                  anything else is refused
    diffusion_gemma.block_count, .embedding_length, .feed_forward_length, .expert_count, .expert_used_count,
    .expert_feed_forward_length, .attention.head_count, .attention.head_count_kv (one value or one per layer),
    .attention.key_length (full layers' head dim), .attention.key_length_swa (sliding layers' head dim),
    .attention.sliding_window, .attention.sliding_window_pattern (one bool per layer, true = sliding)  required
    .context_length, .rope.freq_base (1e6), .rope.freq_base_swa (1e4), .rope.partial_rotary_factor (0.25),
    .attention.layer_norm_rms_epsilon (1e-6), .final_logit_softcapping (30), .canvas_length (256)     optional
    tokenizer.ggml.bos_token_id / eos_token_id / eot_token_id / padding_token_id                        optional
    tokenizer.huggingface.json, or tokenizer.ggml.model "llama" with .tokens / .scores / .token_type /
    .add_space_prefix, or "gpt2" with .tokens / .merges / .token_type / .pre, tokenizer.chat_template
                                                                                 optional (`GGUFFile.tokenizer`)

Tensor names (`N` = layer; shapes in PyTorch order; norms are multiplied as stored, no 1 + w):

    token_embd.weight -> embed_tokens (tied head)    output_norm.weight -> norm
    blk.N.attn_q/attn_k/attn_v/attn_output.weight -> self_attn.q_proj/k_proj/v_proj/o_proj
    blk.N.attn_q_norm/attn_k_norm.weight -> self_attn.q_norm/k_norm
    blk.N.attn_norm / post_attention_norm / ffn_norm / post_ffw_norm / post_ffw_norm_1 / pre_ffw_norm_2 /
          post_ffw_norm_2 .weight -> input_layernorm / post_attention_layernorm / pre_feedforward_layernorm /
          post_feedforward_layernorm / post_feedforward_layernorm_1 / pre_feedforward_layernorm_2 /
          post_feedforward_layernorm_2
    blk.N.ffn_gate/ffn_up/ffn_down.weight -> mlp.gate_proj/up_proj/down_proj
    blk.N.ffn_gate_inp.weight / .scale -> router.proj / router.scale;  blk.N.ffn_down_exps.scale -> per_expert_scale
    blk.N.ffn_gate_up_exps.weight [E, 2I, H], or ffn_gate_exps + ffn_up_exps [E, I, H] -> experts.gate_up_proj
    blk.N.ffn_down_exps.weight [E, H, I] -> experts.down_proj
    blk.N.layer_output_scale.weight -> layer scalar (both passes); blk.N.enc_layer_output_scale.weight -> encoder's
    sc.ffn_gate/ffn_up/ffn_down/ffn_norm.weight -> self_conditioning.gate_proj/up_proj/down_proj/pre_norm

Q8_0, Q4_0 and Q4_1 weights are repacked without arithmetic into dgemma's int8 / int4 formats (group 32); Q5_0
(codes q - 16) and Q5_1 (codes q, offset the block's minimum) into int8 with group 32, their fifth bits joined by bit
operations (exact). The K-quants of Q4_K_M / Q5_K_M / Q6_K files are repacked too, their codes by bit operations
only: Q4_K -> int4 and Q5_K -> int8 (codes 0..31), both with group 32, scale d * sc and offset -dmin * m per
32-weight sub-block, each product of a float16 by a 6-bit integer rounded to float16 (so within float16 rounding of
llama.cpp's values, not bit-exact); Q6_K -> int8 codes q - 32 with group 16 and float32 scales d * sc (exact); Q3_K
and Q2_K (3- and 2-bit codes in sub-blocks of 16) -> int4 with group 16, float16 scales and offsets (0.75 bytes per
weight; within float16 rounding, as Q4_K). Scales or offsets that would overflow float16 stay float32. Gate and up
experts of one kind (int8 or int4; an int4 half next to an int8 one becomes int8, exact) whose groups divide each
other fuse into the smaller group; other mixes (a float half) load as float. IQ types become int8 codes, exact:
IQ4_NL (float16 scale d per 32) and IQ4_XS (float32 d * (ls - 32) per 32) by looking their 4-bit indices up in the
type's value table; the lattice types IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S,
IQ1_S and IQ1_M, whose values are a per-group step times a small integer read from grids only the package holds, by
decoding with the package a few rows at a time and dividing by the steps read from the blocks (`_STEPPED`; groups of
32, or 16 for IQ2_XS, IQ2_S and IQ1_M; float32 steps; loading checks every quotient is a whole number that fits int8).
IQ3_S (odd integers -15..15) and IQ1_S (three integers 8 apart per group) go on to int4 with group 32, scale and
offset rounded to float16 as Q3_K's (checked to be evenly spaced as the type defines).
MXFP4 (the experts of llama.cpp's MXFP4_MOE files) becomes int8 codes, twice the FP4 values, with group 32 and
float32 power-of-two scales (exact). F32, F16 and BF16 load as float; every other type the package can decode
(TQ1_0, TQ2_0, NVFP4, ...) is dequantized to float.
A file's tokenizer is read where it carries a whole tokenizer.json (`tokenizer.huggingface.json`), a llama.cpp
SentencePiece BPE ("llama") or "gpt2" byte-level BPE vocabulary (`GGUFFile.tokenizer`); with another, a model takes
token ids, or text through a tokenizer given to `dgemma.load(..., tokenizer=...)`.
Must not: write GGUF files or guess a mapping for other architectures.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import GenerationSettings, ModelConfig
from ..tokenizer import Tokenizer
from .convert import Entry
from .formats import QTensor, dequantize, pack_int4, unpack_int4
from .gguf_reader import GGUFReader
from .modules import role

ARCH = "diffusion_gemma"
_LAYER = {
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight", "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "router.proj.weight", "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj", "ffn_down_exps.weight": "experts.down_proj",
}
_GLOBAL = {
    "token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
    "sc.ffn_gate.weight": "self_conditioning.gate_proj.weight", "sc.ffn_up.weight": "self_conditioning.up_proj.weight",
    "sc.ffn_down.weight": "self_conditioning.down_proj.weight", "sc.ffn_norm.weight": "self_conditioning.pre_norm.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)$")
_DECODE_ELEMENTS = 1 << 22  # weights decoded at once by the gguf package when loading a lattice (IQ) type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6  # llama.cpp's tokenizer.ggml.token_type values
_REQUIRED = object()


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'dgemma[gguf]'") from None
    return gguf


def is_gguf(path: str | os.PathLike) -> bool:
    """True for an existing file named *.gguf."""
    p = Path(path).expanduser()
    return p.suffix.lower() == ".gguf" and p.is_file()


class GGUFFile:
    """An open GGUF file: its config, and its tensors mapped to dgemma parameter names."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        _gguf()
        try:
            self.reader = GGUFReader(self.path)
        except ValueError as err:
            raise ValueError(f"{self.path}: not a readable GGUF file ({err})") from None
        arch = self._field("general.architecture", None)
        if arch != ARCH:
            raise ValueError(f"{self.path}: GGUF architecture {arch!r} is not supported; dgemma reads "
                             f"architecture {ARCH!r} (DiffusionGemma)")
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            self._check_type(t)
        if "token_embd.weight" not in self.tensors:
            raise ValueError(f"{self.path}: no token_embd.weight tensor")
        self.config = self._config()
        self.settings = GenerationSettings()

    def _field(self, key: str, default=_REQUIRED):
        if key not in self.reader.fields:
            if default is _REQUIRED:
                raise ValueError(f"{self.path}: GGUF metadata lacks {key!r}")
            return default
        return self.reader.fields[key]

    def _float(self, key: str, default: float) -> float:
        """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
        return float(str(np.float32(self._field(key, default))))

    def _check_type(self, t) -> None:
        gguf = _gguf()
        q = gguf.GGMLQuantizationType
        if t.tensor_type in (q.F32, q.F16, q.BF16) or t.tensor_type.name in _REPACKED:
            return
        _, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        try:
            gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), t.tensor_type)  # one zero block
        except NotImplementedError:
            raise ValueError(f"{self.path}: tensor {t.name!r} has GGML type {t.tensor_type.name}, which the gguf "
                             "package cannot decode") from None

    def _eos_ids(self) -> list[int]:
        """The end ids the file names: `tokenizer.ggml.eos_token_id`, then `.eot_token_id`."""
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        return [int(e) for e in (self._field(k, None) for k in keys) if e is not None]

    def _config(self) -> ModelConfig:
        a = ARCH + "."
        n = int(self._field(a + "block_count"))
        pattern = self._field(a + "attention.sliding_window_pattern")
        kv = self._field(a + "attention.head_count_kv")
        kv = [int(kv)] * n if isinstance(kv, (int, np.integer)) else [int(v) for v in kv]
        if len(pattern) != n or len(kv) != n:
            raise ValueError(f"{self.path}: per-layer metadata does not have {n} entries (block_count)")
        dims = {True: int(self._field(a + "attention.key_length_swa")), False: int(self._field(a + "attention.key_length"))}
        types = ["sliding_attention" if s else "full_attention" for s in pattern]
        vocab = int(self.tensors["token_embd.weight"].shape[1])  # ggml order: [hidden, vocab]
        text = {
            "vocab_size": vocab, "hidden_size": int(self._field(a + "embedding_length")),
            "intermediate_size": int(self._field(a + "feed_forward_length")), "num_hidden_layers": n,
            "num_attention_heads": int(self._field(a + "attention.head_count")), "num_key_value_heads": kv[0],
            "head_dim": dims[True], "layer_types": types,
            "per_layer_config": {str(i): {"head_dim": dims[bool(s)], "num_key_value_heads": kv[i]}
                                 for i, s in enumerate(pattern)},
            "num_experts": int(self._field(a + "expert_count")),
            "top_k_experts": int(self._field(a + "expert_used_count")),
            "moe_intermediate_size": int(self._field(a + "expert_feed_forward_length")),
            "sliding_window": int(self._field(a + "attention.sliding_window")),
            "max_position_embeddings": int(self._field(a + "context_length", 262_144)),
            "rms_norm_eps": self._float(a + "attention.layer_norm_rms_epsilon", 1e-6),
            "final_logit_softcapping": self._float(a + "final_logit_softcapping", 30.0),
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": self._float(a + "rope.freq_base_swa", 1e4)},
                "full_attention": {"rope_type": "proportional",
                                   "rope_theta": self._float(a + "rope.freq_base", 1e6),
                                   "partial_rotary_factor": self._float(a + "rope.partial_rotary_factor", 0.25)},
            },
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id", 2),
            "pad_token_id": self._field("tokenizer.ggml.padding_token_id", 0),
            "eos_token_id": sorted(set(self._eos_ids())) or [1],
        }
        return ModelConfig.from_hf_dict({"model_type": "diffusion_gemma", "text_config": text,
                                         "canvas_length": int(self._field(a + "canvas_length", 256))})

    def tokenizer(self) -> Tokenizer | None:
        """The file's own tokenizer, or None where it holds none that is read here:
        - the whole tokenizer.json where `tokenizer.huggingface.json` carries it;
        - a llama.cpp "gpt2" vocabulary with the GPT-2 pre-tokenizer (`tokenizer.ggml.pre` "gpt-2"; llama.cpp's
          "default" splits digits and punctuation apart, which is not rebuilt): a byte-level BPE from `.tokens` and
          `.merges`;
        - a llama.cpp "llama" (SentencePiece BPE) vocabulary, as Gemma's: `.tokens` and `.scores`, merged as
          SentencePiece (and llama.cpp) merge them (`Tokenizer.sentencepiece_bpe`; Gemma's Hugging Face
          tokenizer.json splits some runs of spaces differently), `.add_space_prefix` (default true) honoured, a
          prefix also after every control or user-defined piece, as llama.cpp puts one; not where
          `.remove_extra_whitespaces` is set.
        `.token_type` marks control tokens (special), user-defined ones (matched whole), byte pieces and the unknown
        piece. Other vocabularies are not read. Special ids from `tokenizer.ggml.*_token_id` (a BOS only where one is
        given and `add_bos_token` is not false), the chat template from `tokenizer.chat_template`. Malformed metadata,
        or more ids than the model's vocabulary, is a ValueError naming the file."""
        import tokenizers

        text = self._field("tokenizer.huggingface.json", None)
        model, pre = self._field("tokenizer.ggml.model", None), self._field("tokenizer.ggml.pre", None)
        spm = model == "llama" and not self._field("tokenizer.ggml.remove_extra_whitespaces", False)
        if text is None and (model, pre) != ("gpt2", "gpt-2") and not spm:
            return None
        try:
            if text is not None:
                backend = tokenizers.Tokenizer.from_str(text)
            else:
                tokens = list(self._field("tokenizer.ggml.tokens"))
                kinds = list(self._field("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
                vocab = {t: i for i, t in enumerate(tokens)}
                if len(kinds) != len(tokens) or len(vocab) != len(tokens):
                    raise ValueError(f"{len(tokens)} tokens ({len(tokens) - len(vocab)} repeated), {len(kinds)} "
                                     "token types")
                of_kind = {k: [t for t, kind in zip(tokens, kinds) if kind == k] for k in set(kinds)}
                special, added = of_kind.get(_CONTROL, []), of_kind.get(_USER_DEFINED, [])
                if spm:
                    scores = list(self._field("tokenizer.ggml.scores"))
                    if len(scores) != len(tokens):
                        raise ValueError(f"{len(tokens)} tokens, {len(scores)} scores")
                    unk = of_kind.get(_UNKNOWN, [None])[0]
                    prefix = bool(self._field("tokenizer.ggml.add_space_prefix", True))
                    backend = Tokenizer.sentencepiece_bpe(tokens, scores, special, added, of_kind.get(_BYTE, []), unk,
                                                          prefix)
                else:
                    merges = [tuple(m.split(" ", 1)) for m in self._field("tokenizer.ggml.merges", [])]
                    if any(len(m) != 2 or m[0] not in vocab or m[1] not in vocab for m in merges):
                        raise ValueError("a merge is not two tokens of the vocabulary")
                    backend = Tokenizer.byte_level_bpe(vocab, merges, special, added)
        except Exception as err:  # the tokenizers library raises bare Exceptions for bad input
            raise ValueError(f"{self.path}: malformed tokenizer metadata ({err}); pass a tokenizer with "
                             "--tokenizer") from None
        bos = self._field("tokenizer.ggml.bos_token_id", None)
        ids = {"bos_token_id": bos if self._field("tokenizer.ggml.add_bos_token", True) else None,
               "eos_token_ids": self._eos_ids(),
               "pad_token_id": self._field("tokenizer.ggml.padding_token_id", None)}
        tok = Tokenizer(backend, self._field("tokenizer.chat_template", None), ids)
        return tok.check_fits(self.config.vocab_size, f"in {self.path}")

    @property
    def total_bytes(self) -> int:
        """The bytes `entries` yields (repacked, fused or decoded; what a conversion reads), from the meta device."""
        return sum(v.nbytes if isinstance(v, QTensor) else v.numel() * v.element_size()
                   for _, v in self.entries(meta=True))

    def describe(self, dtype: torch.dtype) -> dict:
        """{"quantization": the tensor types and their counts, "resident_bytes": n}: the bytes the loaded weights take,
        from `entries` on the meta device (repacked, fused or decoded as loading does, but nothing read), float
        tensors and quantized ones that load as float (a router) counted at `dtype`."""
        counts: dict[str, int] = {}
        for t in self.reader.tensors:
            if t.name != "output.weight":  # not loaded: the head is tied to token_embd
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        resident = sum(v.nbytes if isinstance(v, QTensor) and role(name) is not None  # else decoded to float
                       else math.prod(v.shape) * dtype.itemsize for name, v in self.entries(meta=True)
                       if "_layer_scalars." not in name)
        resident += 2 * self.config.num_hidden_layers * dtype.itemsize  # the layer scalars of both passes (`build`)
        types = ", ".join(f"{n} x{c}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1]))
        return {"quantization": f"GGUF tensors {types}", "resident_bytes": resident}

    def _value(self, name: str, meta: bool = False) -> QTensor | torch.Tensor:
        """One tensor in PyTorch order: repacked into a QTensor when its blocks map exactly, else float. With `meta`,
        the same tensors on the meta device: shapes and dtypes only, nothing read or decoded."""
        gguf = _gguf()
        q = gguf.GGMLQuantizationType
        t = self.tensors[name]
        data = t.data
        kind = t.tensor_type.name
        shape = tuple(int(n) for n in reversed(t.shape))  # [..., N, K] (ggml lists dimensions innermost first)
        if kind not in _REPACKED and kind not in _STEPPED:
            if meta:
                dtype = {q.F16: torch.float16, q.BF16: torch.bfloat16}.get(t.tensor_type, torch.float32)
                return torch.empty(shape, dtype=dtype, device="meta")
            if t.tensor_type in (q.F32, q.F16):
                return torch.from_numpy(np.array(data))
            if t.tensor_type == q.BF16:
                return torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(gguf.quants.dequantize(np.array(data), t.tensor_type).astype(np.float32))
        _, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        block_shape = (*data.shape[:-1], data.shape[-1] // size, size)  # [..., N, K/block, block bytes]
        rows = None if meta else np.array(data).reshape(-1, data.shape[-1])  # [rows, row bytes]
        blocks = torch.empty(block_shape, dtype=torch.uint8, device="meta") if meta else \
            torch.from_numpy(rows).reshape(block_shape)
        if kind in _REPACKED:
            return _REPACKED[kind](blocks)
        q = _stepped(kind, blocks, rows)
        if q is None:
            raise ValueError(f"{self.path}: {kind} tensor {name!r} decodes to values that are not the whole "
                             "multiples of their block scales the type defines (a non-finite or corrupt scale?)")
        return q

    def _target(self, name: str) -> str | None:
        if name in _GLOBAL:
            return _GLOBAL[name]
        match = _BLOCK.fullmatch(name)
        if match is None:
            return None
        layer, rest = match.groups()
        if rest == "layer_output_scale.weight":
            return f"decoder_layer_scalars.{layer}"
        if rest == "enc_layer_output_scale.weight":
            return f"encoder_layer_scalars.{layer}"
        return f"layers.{layer}.{_LAYER[rest]}" if rest in _LAYER else None

    def entries(self, meta: bool = False) -> Iterator[Entry]:
        """(parameter name, QTensor or float tensor) for every tensor, gate and up experts fused into gate_up; with
        `meta`, on the meta device (`_value`)."""
        for name in self.tensors:
            match = _BLOCK.fullmatch(name)
            if match and match.group(2) in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
                if match.group(2) == "ffn_up_exps.weight":
                    continue
                up_name = f"blk.{match.group(1)}.ffn_up_exps.weight"
                if up_name not in self.tensors:
                    raise ValueError(f"{self.path}: {name} has no matching {up_name}")
                fused = _fuse(self._value(name, meta), self._value(up_name, meta))
                yield f"layers.{match.group(1)}.experts.gate_up_proj", fused
                continue
            if name == "output.weight":  # an untied head copy; the model ties its head to token_embd
                continue
            target = self._target(name)
            if target is None:
                raise ValueError(f"{self.path}: unexpected GGUF tensor {name!r} for architecture {ARCH!r}")
            yield target, self._value(name, meta)


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of each block uint8 [..., size], as float32 [..., 1]."""
    return blocks[..., at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(x: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> its 2n nibbles, each byte's low one first: uint8 [..., 2n]."""
    return torch.stack([x & 15, x >> 4], -1).flatten(-2)


def _q8_0(blocks: torch.Tensor) -> QTensor:
    """Q8_0 blocks uint8 [..., N, K/32, 34] (scale f16, 32 int8 codes) -> int8 QTensor with group 32."""
    scale = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)  # [..., N, K/32]
    return QTensor("int8", blocks[..., 2:].contiguous().view(torch.int8).flatten(-2), scale)


def _q4_0(blocks: torch.Tensor) -> QTensor:
    """Q4_0 blocks uint8 [..., N, K/32, 18] (scale f16, 16 bytes of codes, value scale * (q - 8)) -> int4, group 32."""
    scale = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)  # [..., N, K/32]
    return QTensor("int4", blocks[..., 2:].flatten(-2).contiguous(), scale, (scale.float() * -8).half())


def _q4_1(blocks: torch.Tensor) -> QTensor:
    """Q4_1 blocks uint8 [..., N, K/32, 20] (scale f16, min f16, 16 bytes of codes) -> int4 QTensor with group 32."""
    scale = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)  # [..., N, K/32]
    offset = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)  # [..., N, K/32]
    return QTensor("int4", blocks[..., 4:].flatten(-2).contiguous(), scale, offset)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> its 8n bits, least significant first: uint8 [..., n, 8] of 0 and 1."""
    return (qh[..., None] >> torch.arange(8, dtype=torch.uint8, device=qh.device)) & 1


def _crumbs(x: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 1, n] -> its 2-bit fields, least significant first: uint8 [..., 4, n] (row i: bits 2i and 2i + 1)."""
    return (x >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=x.device).view(4, 1)) & 3


def _five_bit_codes(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1 code bytes: qh uint8 [..., 4] (the fifth bits, a little-endian uint32: bit j is weight j's) and
    qs [..., 16] (byte j: weight j's low 4 bits in its low nibble, weight j + 16's in its high one) -> codes 0..31
    uint8 [..., 32]."""
    return torch.cat([qs & 15, qs >> 4], -1) | (_bits(qh).flatten(-2) << 4)


def _q5_0(blocks: torch.Tensor) -> QTensor:
    """Q5_0 blocks uint8 [..., N, K/32, 22] (scale d f16, qh[4], qs[16]; value d * (q - 16)) -> int8 QTensor with
    group 32, codes q - 16 (exact)."""
    codes = _five_bit_codes(blocks[..., 2:6], blocks[..., 6:])  # [..., N, K/32, 32]
    scale = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)  # [..., N, K/32]
    return QTensor("int8", (codes.to(torch.int8) - 16).flatten(-2), scale)


def _q5_1(blocks: torch.Tensor) -> QTensor:
    """Q5_1 blocks uint8 [..., N, K/32, 24] (scale d f16, minimum m f16, qh[4], qs[16]; value d * q + m) -> int8
    QTensor with group 32, codes q and offset m (exact)."""
    codes = _five_bit_codes(blocks[..., 4:8], blocks[..., 8:])  # [..., N, K/32, 32]
    scale, offset = blocks[..., :4].contiguous().view(torch.float16).unbind(-1)  # [..., N, K/32] each
    return QTensor("int8", codes.to(torch.int8).flatten(-2), scale, offset)


def _compact(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scales and offsets -> float16 when every value stays finite there (on the meta device, which cannot
    tell, float16), else float32 as they are."""
    halves = scale.half(), offset.half()
    if scale.device.type == "meta" or all(bool(torch.isfinite(h).all()) for h in halves):
        return halves
    return scale, offset


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K super-blocks uint8 [..., N, K/256, size] (d f16, dmin f16, scales[12]: eight 6-bit scales sc and
    eight 6-bit mins m, ...) -> per 32-weight sub-block i the scale d * sc[i] and offset -dmin * m[i], each rounded
    to float16 (`_compact`): [..., N, K/32] each."""
    d, dmin = _half(blocks, 0), _half(blocks, 2)  # [..., N, B, 1] each
    packed = blocks[..., 4:16].unflatten(-1, (3, 4))  # [..., N, B, 3, 4]
    lo, hi, mixed = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]  # [..., N, B, 4] each
    # Sub-blocks 0-3: 6 bits in the low bits of bytes 0-3 (scales) and 4-7 (mins). Sub-blocks 4-7: low 4 bits in
    # bytes 8-11 (scales low nibble, mins high nibble), top 2 bits in the top 2 bits of bytes 0-3 / 4-7.
    sc = torch.cat([lo & 63, (mixed & 15) | ((lo >> 6) << 4)], -1)  # [..., N, B, 8]
    m = torch.cat([hi & 63, (mixed >> 4) | ((hi >> 6) << 4)], -1)  # [..., N, B, 8]
    return _compact((d * sc.float()).flatten(-2), (-(dmin * m.float())).flatten(-2))


def _q4_k(blocks: torch.Tensor) -> QTensor:
    """Q4_K super-blocks uint8 [..., N, K/256, 144] -> int4 QTensor [..., N, K] with group 32.
    A block is d f16, dmin f16, scales[12], qs[128]; weight value d * sc[i] * q - dmin * m[i] for sub-block i of 32
    (`_k_scales`). In each 64-weight chunk c, qs byte 32c + j holds weight j of sub-block 2c in its low nibble and
    weight j of sub-block 2c + 1 in its high one. The codes are moved into the int4 nibble layout by bit operations."""
    lead = blocks.shape[:-2]  # [..., N]
    qs = blocks[..., 16:].unflatten(-1, (4, 1, 32))  # [..., N, B, chunk, 1, j]
    codes = torch.cat([qs & 15, qs >> 4], -2).flatten(-3, -2)  # [..., N, B, 8 sub-blocks, 32]
    return QTensor("int4", pack_int4(codes.reshape(*lead, -1), 32), *_k_scales(blocks))


def _q5_k(blocks: torch.Tensor) -> QTensor:
    """Q5_K super-blocks uint8 [..., N, K/256, 176] -> int8 QTensor [..., N, K] with group 32, codes 0..31 and
    float16 scales and offsets. A block is d f16, dmin f16, scales[12], qh[32], qs[128]; weight value
    d * sc[i] * q - dmin * m[i] for sub-block i of 32 (`_k_scales`), q a 5-bit code. The low 4 bits lie as in Q4_K;
    weight j of sub-block i has its fifth bit in qh byte j at bit i."""
    lead = blocks.shape[:-2]  # [..., N]
    qs = blocks[..., 48:].unflatten(-1, (4, 1, 32))  # [..., N, B, chunk, 1, j]
    low = torch.cat([qs & 15, qs >> 4], -2).flatten(-3, -2)  # [..., N, B, 8 sub-blocks, 32]
    high = _bits(blocks[..., 16:48]).transpose(-1, -2) << 4  # [..., N, B, 8 sub-blocks, 32]
    return QTensor("int8", (low | high).to(torch.int8).reshape(*lead, -1), *_k_scales(blocks))


def _q6_k(blocks: torch.Tensor) -> QTensor:
    """Q6_K super-blocks uint8 [..., N, K/256, 210] -> int8 QTensor [..., N, K] with group 16 and float32 scales.
    A block is ql[128], qh[64], scales[16] int8, d f16; weight value d * sc[i] * (q - 32) for sub-block i of 16, q a
    6-bit code. In each 128-weight half h, weight r has its low 4 bits in ql byte 64h + r % 64 (low nibble for
    r < 64, high nibble above) and its top 2 bits in qh byte 32h + r % 32 at bit 2 * (r // 32). Codes q - 32 are
    assembled by bit operations; d * sc is exact in float32 (at most 18 significant bits), and so is
    code * scale (at most 23)."""
    lead = blocks.shape[:-2]  # [..., N]
    ql = blocks[..., :128].unflatten(-1, (2, 1, 64))  # [..., N, B, half, 1, 64]
    qh = blocks[..., 128:192].unflatten(-1, (2, 1, 32))  # [..., N, B, half, 1, 32]
    low = torch.cat([ql & 15, ql >> 4], -2).flatten(-2)  # [..., N, B, half, 128]
    high = _crumbs(qh).flatten(-2)  # [..., N, B, half, 128]
    codes = (low | (high << 4)).to(torch.int8) - 32  # [..., N, B, half, 128], -32..31
    sc = blocks[..., 192:208].contiguous().view(torch.int8).float()  # [..., N, B, 16]
    d = _half(blocks, 208)  # [..., N, B, 1]
    return QTensor("int8", codes.reshape(*lead, -1), (d * sc).flatten(-2))


def _two_bit_codes(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K / Q3_K qs uint8 [..., 64] -> their 2-bit fields in weight order [..., 8, 32]: weight 32j + l (j 0..7,
    l 0..31) lies in byte 32 * (j // 4) + l at bit 2 * (j % 4)."""
    return _crumbs(qs.unflatten(-1, (2, 1, 32))).flatten(-3, -2)  # [..., half, 4, 32] -> [..., 8, 32]


def _q3_k(blocks: torch.Tensor) -> QTensor:
    """Q3_K super-blocks uint8 [..., N, K/256, 110] -> int4 QTensor [..., N, K] with group 16, codes 0..7, float16
    scales d * (sc - 32) and offsets -4 * scale. A block is hmask[32], qs[64], scales[12], d f16; weight value
    d * (sc[i] - 32) * (q - 4) for sub-block i of 16, q = 4 * high bit + low 2 bits. Weight 32j + l has its low bits
    as `_two_bit_codes` says and its high bit in hmask byte l at bit j. Sub-block i's 6-bit sc has its low 4 bits in
    byte i % 8 (low nibble for i < 8, high above) and its top 2 in byte 8 + i % 4 at bit 2 * (i // 4). Codes move by
    bit operations; d * (sc - 32) is rounded to float16 (`_compact`; so within float16 rounding of llama.cpp's
    values), and the offset, four times that, is exact."""
    bit = torch.arange(8, dtype=torch.uint8, device=blocks.device)[:, None]  # [8, 1]
    high = (blocks[..., None, :32] >> bit) & 1  # [..., N, B, 8 (j), 32 (l)]
    codes = _two_bit_codes(blocks[..., 32:96]) | (high << 2)  # [..., N, B, 8, 32]
    packed = blocks[..., 96:108]  # [..., N, B, 12]
    low = torch.cat([packed[..., :8] & 15, packed[..., :8] >> 4], -1)  # [..., N, B, 16]
    top = _crumbs(packed[..., None, 8:12]).flatten(-2)  # [..., N, B, 16]
    sc = (low | (top << 4)).float() - 32  # [..., N, B, 16]
    d = _half(blocks, 108)  # [..., N, B, 1]
    scale = (d * sc).flatten(-2)  # [..., N, K/16], exact in float32
    return QTensor("int4", pack_int4(codes.flatten(-3), 16), *_compact(scale, scale * -4))


def _q2_k(blocks: torch.Tensor) -> QTensor:
    """Q2_K super-blocks uint8 [..., N, K/256, 84] -> int4 QTensor [..., N, K] with group 16, codes 0..3, float16
    scales d * (sc[i] & 15) and offsets -dmin * (sc[i] >> 4) (each rounded to float16 by `_compact`, so within
    float16 rounding of llama.cpp's values). A block is scales[16], qs[64] (`_two_bit_codes`), d f16, dmin f16;
    weight value d * (sc[i] & 15) * q - dmin * (sc[i] >> 4) for sub-block i of 16."""
    sc = blocks[..., :16]  # [..., N, B, 16]
    d, dmin = _half(blocks, 80), _half(blocks, 82)  # [..., N, B, 1] each
    scale = (d * (sc & 15).float()).flatten(-2)  # [..., N, K/16]
    offset = (-(dmin * (sc >> 4).float())).flatten(-2)
    codes = _two_bit_codes(blocks[..., 16:80]).flatten(-3)  # [..., N, K] in weight order
    return QTensor("int4", pack_int4(codes, 16), *_compact(scale, offset))


_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # IQ4_NL / IQ4_XS codes
_MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # twice the FP4 (e2m1) values


def _iq4_codes(qs: torch.Tensor, values: tuple[int, ...] = _IQ4_VALUES) -> torch.Tensor:
    """4-bit index bytes uint8 [..., 16] (byte j: weight j's index in its low nibble, weight j + 16's in its high
    one) -> the table values the indices name, int8 [..., 32]."""
    table = torch.tensor(values, dtype=torch.int8, device=qs.device)
    return table[torch.cat([qs & 15, qs >> 4], -1).long()]


def _mxfp4(blocks: torch.Tensor) -> QTensor:
    """MXFP4 blocks uint8 [..., N, K/32, 17] (e, an E8M0 exponent byte; qs[16] of FP4 indices as `_iq4_codes` reads
    them) -> int8 QTensor with group 32: codes twice the FP4 values, float32 scales 2^(e - 128) (half the block's
    power of two; for e = 0 and 1 the float32 subnormals 2^-128 and 2^-127), exact."""
    e = blocks[..., 0].int()  # [..., N, K/32]
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)  # float32 bit patterns
    return QTensor("int8", _iq4_codes(blocks[..., 1:], _MXFP4_VALUES).flatten(-2), bits.view(torch.float32))


def _iq4_nl(blocks: torch.Tensor) -> QTensor:
    """IQ4_NL blocks uint8 [..., N, K/32, 18] (d f16, qs[16]; value d * table[index]) -> int8 QTensor with group 32,
    codes table[index] (exact)."""
    return QTensor("int8", _iq4_codes(blocks[..., 2:]).flatten(-2), _half(blocks, 0).squeeze(-1).half())


def _iq4_xs(blocks: torch.Tensor) -> QTensor:
    """IQ4_XS super-blocks uint8 [..., N, K/256, 136] -> int8 QTensor [..., N, K] with group 32, codes table[index]
    and float32 scales d * (ls - 32) (exact). A block is d f16, scales_h u16, scales_l[4], qs[128]; sub-block i of 32
    has the 6-bit ls with its low 4 bits in scales_l byte i // 2 (low nibble for even i) and its top 2 in scales_h at
    bit 2i, and its indices in qs bytes 16i..16i + 15 as `_iq4_codes` reads them."""
    lead = blocks.shape[:-2]  # [..., N]
    high = blocks[..., 2:4].int()  # [..., N, B, 2]: scales_h, little-endian
    high = ((high[..., :1] | (high[..., 1:] << 8)) >> torch.arange(0, 16, 2, device=blocks.device)) & 3  # [.., B, 8]
    ls = _nibbles(blocks[..., 4:8]).int() | (high << 4)  # [..., N, B, 8]
    codes = _iq4_codes(blocks[..., 8:].unflatten(-1, (8, 16)))  # [..., N, B, 8, 32]
    return QTensor("int8", codes.reshape(*lead, -1), (_half(blocks, 0) * (ls - 32).float()).flatten(-2))


# GGML types repacked into QTensors: blocks uint8 [..., N, K/block, block bytes] -> QTensor.
_REPACKED = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k, "Q5_K": _q5_k,
             "Q6_K": _q6_k, "Q3_K": _q3_k, "Q2_K": _q2_k, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs, "MXFP4": _mxfp4}


def _iq1_m_step(blocks: torch.Tensor) -> torch.Tensor:
    """IQ1_M super-blocks uint8 [..., B, 56] (qs[32], qh[16], scales u16[4]) -> the value of one code step (an
    eighth of d * (2s + 1)) per 16 weights [..., B, 16]. d is a float16 made of the top nibbles of the four scales
    words (word 0's is its lowest nibble); sub-block 4w + j has the 3-bit s at bit 3j of word w."""
    words = blocks[..., 48:56].int()  # [..., B, 8]
    words = words[..., 0::2] | (words[..., 1::2] << 8)  # [..., B, 4]
    top = words >> 12  # [..., B, 4]: d's nibbles, least significant first
    d = (top[..., 0] | (top[..., 1] << 4) | (top[..., 2] << 8) | (top[..., 3] << 12)).to(torch.int16)
    d = d.view(torch.float16).float().unsqueeze(-1)  # [..., B, 1]
    s = (words[..., None] >> torch.tensor([0, 3, 6, 9], device=blocks.device)) & 7  # [..., B, 4, 4]
    return d * (2 * s.flatten(-2) + 1).float() / 8


# GGML types whose values are a per-group step times a small integer, the integers read from lattice tables only
# the gguf package's decoder holds: group size G, blocks uint8 [..., B, block bytes] -> that step per group
# float32 [..., B, 256 / G], and, for the types whose integers in a group are evenly spaced, 16 at most, the spacing
# and blocks -> the lowest integer per group int [..., B, 256 / G]. Loading decodes such a tensor with the package
# and divides by the steps (`_stepped`), giving int8 codes that reproduce the decoded values exactly; evenly spaced
# ones become int4 codes (integer - lowest) / spacing, with scale spacing * step and offset lowest * step.
_STEPPED = {
    "IQ2_XXS": (32, lambda b: _half(b, 0) * ((b[..., 9:66:8] >> 4).float() + 0.5) * 0.25, None),
    "IQ2_XS": (16, lambda b: _half(b, 0) * (_nibbles(b[..., 66:74]).float() + 0.5) * 0.25, None),
    "IQ2_S": (16, lambda b: _half(b, 0) * (_nibbles(b[..., 74:82]).float() + 0.5) * 0.25, None),
    "IQ3_XXS": (32, lambda b: _half(b, 0) * ((b[..., 69:98:4] >> 4).float() + 0.5) * 0.5, None),
    # the odd integers -15..15
    "IQ3_S": (32, lambda b: _half(b, 0) * (2 * _nibbles(b[..., 106:110]).float() + 1),
              (2, lambda b: torch.full((*b.shape[:-1], 8), -15, device=b.device))),
    # 8 * (g + delta) for g in -1, 0, 1 and delta = 1/8, or -1/8 where bit 15 of the group's qh word is set
    "IQ1_S": (32, lambda b: _half(b, 0) * (2 * ((b[..., 35:50:2] >> 4) & 7).float() + 1) / 8,
              (8, lambda b: -7 - 2 * (b[..., 35:50:2] >> 7).int())),
    "IQ1_M": (16, _iq1_m_step, None),
}


def _stepped(kind: str, blocks: torch.Tensor, rows: np.ndarray | None) -> QTensor | None:
    """A `_STEPPED` tensor's blocks uint8 [..., N, K/block, block bytes] and the same bytes as rows [R, row bytes]
    (None on the meta device) -> int8 QTensor [..., N, K] with groups of G, or int4 for evenly spaced types; None
    where a decoded value is not a whole multiple of its step, or its integer not one the type's spacing allows (a
    corrupt scale, say). A few rows are decoded at a time, so the float copy stays small."""
    gguf = _gguf()
    group, step_of, affine = _STEPPED[kind]
    step = step_of(blocks).flatten(-2)  # [..., N, K/G]
    lead, k = step.shape[:-1], step.shape[-1] * group
    low = None if affine is None else affine[1](blocks).flatten(-2)  # [..., N, K/G]
    width, dtype = (k, torch.int8) if affine is None else (k // 2, torch.uint8)
    codes = torch.empty((*lead, width), dtype=dtype, device=blocks.device)  # [..., N, K or K/2]
    if rows is not None:
        flat_codes, flat_step = codes.view(-1, width), step.reshape(-1, step.shape[-1])  # [R, ...]
        chunk = max(1, _DECODE_ELEMENTS // k)
        for i in range(0, len(rows), chunk):
            s = flat_step[i:i + chunk].unsqueeze(-1)  # [r, K/G, 1]
            values = torch.from_numpy(gguf.quants.dequantize(rows[i:i + chunk], gguf.GGMLQuantizationType[kind]))
            values = values.unflatten(-1, (-1, group))  # [r, K/G, G]
            c = torch.where(s == 0, 0.0, values / s).round()  # the integers, [r, K/G, G]
            if not (torch.equal(c * s, values) and bool((c.abs() <= 127).all())):
                return None
            if affine is not None:  # a zero step (llama.cpp's d = 0 for all-zero weights) takes the lowest code
                lo = low.reshape(-1, low.shape[-1])[i:i + chunk].unsqueeze(-1).float()  # [r, K/G, 1]
                c = (torch.where(s == 0, lo, c) - lo) / affine[0]  # 0..15 if valid
                if not bool(((c == c.round()) & (c >= 0) & (c <= 15)).all()):
                    return None
                c = pack_int4(c.to(torch.uint8).flatten(-2), group)
            flat_codes[i:i + chunk] = c.flatten(-2) if affine is None else c
    if affine is None:
        return QTensor("int8", codes, step)
    return QTensor("int4", codes, *_compact(affine[0] * step, low.float() * step))


def _regroup(q: QTensor, group: int) -> QTensor:
    """The same weight in groups of `group` inputs, a divisor of its own: scales (and offsets) repeated, int4 codes
    moved into the smaller groups' nibble layout."""
    def repeat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.repeat_interleave(q.group_size // group, -1)
    codes = q.codes if q.kind == "int8" else pack_int4(unpack_int4(q.codes, q.group_size), group)
    return QTensor(q.kind, codes, repeat(q.scale), repeat(q.offset))


def _fuse(gate: QTensor | torch.Tensor, up: QTensor | torch.Tensor) -> QTensor | torch.Tensor:
    """Stack gate [E, I, H] and up [E, I, H] rows into gate_up [E, 2I, H], keeping a shared quantized format. Halves
    of one kind with different groups (int8: Q5_K's 32, Q6_K's 16; int4: Q4_K's 32, Q2_K / Q3_K's 16) share the
    smaller one, the coarser scales (and offsets) repeated, and an int8 half without offsets gets zero ones next to a
    half with them (exact); an int4 half next to an int8 one becomes int8 (its codes 0..15, exact); other mixes are
    dequantized to float."""
    if isinstance(gate, QTensor) and isinstance(up, QTensor) and {gate.kind, up.kind} == {"int8", "int4"}:
        gate, up = (x if x.kind == "int8" else QTensor("int8", unpack_int4(x.codes, x.group_size).to(torch.int8),
                                                       x.scale, x.offset) for x in (gate, up))
    if isinstance(gate, QTensor) and isinstance(up, QTensor) and gate.kind == up.kind and gate.kind in ("int8", "int4"):
        group = min(gate.group_size, up.group_size)
        if gate.group_size != up.group_size and gate.group_size % group == 0 and up.group_size % group == 0:
            gate, up = (_regroup(x, group) for x in (gate, up))
        if (gate.offset is None) != (up.offset is None):
            like = gate.offset if gate.offset is not None else up.offset  # the other half's offsets (float16)
            gate, up = (x if x.offset is not None else
                        QTensor("int8", x.codes, x.scale, torch.zeros(x.scale.shape, dtype=like.dtype,
                                                                      device=like.device))
                        for x in (gate, up))
    if isinstance(gate, QTensor) and isinstance(up, QTensor) and gate.kind == up.kind and \
            gate.group_size == up.group_size:
        def cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            dtype = torch.promote_types(a.dtype, b.dtype)  # float16 (Q8_0) with float32 (Q6_K) scales: float32
            return torch.cat([a.to(dtype), b.to(dtype)], -2)
        return QTensor(gate.kind, torch.cat([gate.codes, up.codes], -2), cat(gate.scale, up.scale),
                       None if gate.offset is None else cat(gate.offset, up.offset))
    as_float = [dequantize(x) if isinstance(x, QTensor) else x.float() for x in (gate, up)]
    return torch.cat(as_float, -2)
