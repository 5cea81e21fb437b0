"""GGUF import: files written here with the gguf package from a tiny random model load and match its logits."""

import copy
import json
import re

import numpy as np
import pytest
import torch

import dgemma
from dgemma.api import Model
from dgemma.config import SLIDING, preset
from dgemma.kernels import int4_cpu
from dgemma.quant import QTensor
from test_quant import _realistic

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# Our parameter names -> GGUF names (the mapping documented in dgemma/quant/gguf.py, written out independently).
_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight", "experts.down_proj": "ffn_down_exps.weight",
}
_GLOBAL = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "self_conditioning.gate_proj.weight": "sc.ffn_gate.weight",
           "self_conditioning.up_proj.weight": "sc.ffn_up.weight",
           "self_conditioning.down_proj.weight": "sc.ffn_down.weight",
           "self_conditioning.pre_norm.weight": "sc.ffn_norm.weight"}


def _gguf_name(ours: str) -> str:
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", ours)
    return f"blk.{match.group(1)}.{_NAMES[match.group(2)]}" if match else _GLOBAL[ours]


def _half_bytes(x) -> np.ndarray:
    """float16 values [n] -> their bytes [n, 2]."""
    return np.asarray(x, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def _power_of_two(x: np.ndarray) -> np.ndarray:
    """The smallest powers of two >= x (1 where x is 0), as float16: a super-block scale whose products with 6-bit
    sub-block scales are exact in float16, so dgemma's float16 Q4_K scales equal the gguf package's float32 ones."""
    return np.exp2(np.ceil(np.log2(np.where(x > 0, x, 1)))).astype(np.float16)


def _k_quant(x: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [R, K] (K a multiple of 256) -> (the first 16 bytes of Q4_K / Q5_K blocks [blocks, 16]: d, dmin and
    the packed 6-bit scales and mins; codes 0..top [blocks, 8, 32]), by a plain min/max rule: per 32-weight sub-block
    value = d * sc * q - dmin * m, d and dmin powers of two (see `_power_of_two`)."""
    sub = x.reshape(-1, 8, 32)  # [blocks, sub-block, weight]
    low = np.minimum(sub.min(-1), 0)  # [blocks, 8]
    step = (sub.max(-1) - low) / top
    d, dmin = _power_of_two(step.max(-1) / 63), _power_of_two(-low.min(-1) / 63)  # [blocks]
    sc = np.clip(np.round(step / d.astype(np.float32)[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-low / dmin.astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
    scale, offset = d.astype(np.float32)[:, None] * sc, dmin.astype(np.float32)[:, None] * m  # [blocks, 8]
    q = np.clip(np.round((sub + offset[..., None]) / scale[..., None]), 0, top).astype(np.uint8)  # [blocks, 8, 32]
    scales = np.concatenate([(sc[:, :4] & 63) | (sc[:, 4:] >> 4 << 6), (m[:, :4] & 63) | (m[:, 4:] >> 4 << 6),
                             (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], -1)  # [blocks, 12]
    return np.concatenate([_half_bytes(d), _half_bytes(dmin), scales], -1), q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Codes [blocks, 8, 32] -> Q4_K / Q5_K qs [blocks, 128]: in 64-weight chunk c, byte 32c + j holds the low 4 bits
    of weight j of sub-block 2c (low nibble) and of sub-block 2c + 1 (high nibble)."""
    pairs = q.reshape(-1, 4, 2, 32) & 15  # [blocks, 64-weight chunk, sub-block of the chunk, j]
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    """float32 [R, K] -> valid Q4_K blocks uint8 [R, K / 256 * 144] (`_k_quant` with 4-bit codes)."""
    r, k = x.shape
    head, q = _k_quant(x, 15)
    return np.concatenate([head, _nibbles(q)], -1).reshape(r, k // 256 * 144)


def _q5_k_blocks(x: np.ndarray) -> np.ndarray:
    """float32 [R, K] -> valid Q5_K blocks uint8 [R, K / 256 * 176] (`_k_quant` with 5-bit codes): qh byte j holds
    the fifth bit of weight j of sub-block i at bit i."""
    r, k = x.shape
    head, q = _k_quant(x, 31)
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8)  # [blocks, 32]
    return np.concatenate([head, qh, _nibbles(q)], -1).reshape(r, k // 256 * 176)


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    """float32 [R, K] (K a multiple of 256) -> valid Q6_K blocks uint8 [R, K / 256 * 210], by absmax per 16 weights:
    value = d * sc * (q - 32)."""
    r, k = x.shape
    sub = x.reshape(-1, 16, 16)  # [blocks, sub-block, weight]
    step = np.abs(sub).max(-1) / 31  # [blocks, 16]
    d = (step.max(-1) / 127).astype(np.float16)  # [blocks]
    df = np.where(d == 0, 1, d).astype(np.float32)[:, None]
    sc = np.clip(np.round(step / df), 1, 127).astype(np.int8)
    scale = (df * sc)[..., None]  # [blocks, 16, 1]
    q = (np.clip(np.round(sub / scale), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)  # [blocks, half, r]
    ql = (q[..., :64] & 15) | ((q[..., 64:] & 15) << 4)  # [blocks, half, 64]
    top = (q >> 4).reshape(-1, 2, 4, 32)  # [blocks, half, r // 32, r % 32]
    qh = top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)  # [blocks, half, 32]
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _half_bytes(d)],
                          -1).reshape(r, k // 256 * 210)


def _crumbs_to_bytes(q: np.ndarray) -> np.ndarray:
    """2-bit fields [blocks, 8, 32] (weight 32j + l) -> Q2_K / Q3_K qs [blocks, 64]: byte 32 * (j // 4) + l holds
    weight 32j + l's field at bit 2 * (j % 4)."""
    f = (q & 3).reshape(-1, 2, 4, 32)  # [blocks, half, j % 4, l]
    return (f[:, :, 0] | (f[:, :, 1] << 2) | (f[:, :, 2] << 4) | (f[:, :, 3] << 6)).reshape(-1, 64)


def _q3_k_blocks(x: np.ndarray) -> np.ndarray:
    """float32 [R, K] -> valid Q3_K blocks uint8 [R, K / 256 * 110], by absmax per 16 weights: value
    d * (sc - 32) * (q - 4), d a power of two."""
    r, k = x.shape
    sub = x.reshape(-1, 16, 16)  # [blocks, sub-block, weight]
    step = np.abs(sub).max(-1) / 4  # [blocks, 16]
    d = _power_of_two(step.max(-1) / 31)  # [blocks]
    sc = np.clip(np.round(step / d.astype(np.float32)[:, None]), 1, 31)  # sc - 32, 1..31
    q = np.clip(np.round(sub / (d.astype(np.float32)[:, None] * sc)[..., None]) + 4, 0, 7).astype(np.uint8)
    q = q.reshape(-1, 8, 32)  # [blocks, j, l]
    hmask = ((q >> 2) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8)  # [blocks, 32]: bit j
    six = (sc + 32).astype(np.uint8)  # [blocks, 16]
    low = (six[:, :8] & 15) | ((six[:, 8:] & 15) << 4)  # [blocks, 8]
    top = (six >> 4).reshape(-1, 4, 4)  # [blocks, i // 4, i % 4]
    high = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)  # [blocks, 4]
    return np.concatenate([hmask, _crumbs_to_bytes(q), low, high, _half_bytes(d)], -1).reshape(r, k // 256 * 110)


def _q2_k_blocks(x: np.ndarray) -> np.ndarray:
    """float32 [R, K] -> valid Q2_K blocks uint8 [R, K / 256 * 84], by min/max per 16 weights: value
    d * sc * q - dmin * m (sc, m 4-bit), d and dmin powers of two."""
    r, k = x.shape
    sub = x.reshape(-1, 16, 16)  # [blocks, sub-block, weight]
    low = np.minimum(sub.min(-1), 0)  # [blocks, 16]
    step = (sub.max(-1) - low) / 3
    d, dmin = _power_of_two(step.max(-1) / 15), _power_of_two(-low.min(-1) / 15)  # [blocks]
    sc = np.clip(np.round(step / d.astype(np.float32)[:, None]), 1, 15).astype(np.uint8)
    m = np.clip(np.round(-low / dmin.astype(np.float32)[:, None]), 0, 15).astype(np.uint8)
    scale, offset = d.astype(np.float32)[:, None] * sc, dmin.astype(np.float32)[:, None] * m  # [blocks, 16]
    q = np.clip(np.round((sub + offset[..., None]) / scale[..., None]), 0, 3).astype(np.uint8).reshape(-1, 8, 32)
    return np.concatenate([sc | (m << 4), _crumbs_to_bytes(q), _half_bytes(d), _half_bytes(dmin)],
                          -1).reshape(r, k // 256 * 84)


# Writers for the K-quants the gguf package cannot quantize, with the relative RMS error their blocks must stay under.
_WRITERS = {Q.Q4_K: (_q4_k_blocks, 0.1), Q.Q5_K: (_q5_k_blocks, 0.1), Q.Q6_K: (_q6_k_blocks, 0.1),
            Q.Q3_K: (_q3_k_blocks, 0.3), Q.Q2_K: (_q2_k_blocks, 0.5)}


def _iq_blocks(qtype, lead, k, d, seed=0) -> np.ndarray:
    """Random valid blocks of an IQ type (any bytes are), with super-block scale d: a float16 at byte 0, except
    IQ1_M's, which lies in the top nibbles of its four scale words (bytes 49, 51, 53, 55; the lowest nibble first)."""
    if qtype != Q.IQ1_M:
        return _random_blocks(qtype, lead, k, {0: d}, seed)
    raw = _random_blocks(qtype, lead, k, {}, seed)
    blocks = raw.reshape(*lead, -1, 56)  # a view
    bits = int(_half_bytes(d).view(np.uint16)[0, 0])
    for w in range(4):
        blocks[..., 49 + 2 * w] = (blocks[..., 49 + 2 * w] & 15) | (((bits >> 4 * w) & 15) << 4)
    return raw


def _iq_like(data: np.ndarray, qtype, seed=0) -> np.ndarray:
    """float32 [..., K] -> random IQ blocks [..., K / block weights * block bytes] whose values have the weights'
    RMS (not their values: these types need lattice searches to write, and only their loading is under test)."""
    lead, k = data.shape[:-1], data.shape[-1]
    unit = gguf.quants.dequantize(_iq_blocks(qtype, lead, k, 1.0, seed), qtype)
    d = np.sqrt(np.mean(data ** 2) / np.mean(unit ** 2))
    return _iq_blocks(qtype, lead, k, d, seed)


def _quantize(data: np.ndarray, qtype) -> np.ndarray:
    """gguf.quants.quantize, plus the K-quants of `_WRITERS` by the rules above and IQ types by `_iq_like`."""
    if qtype.name.startswith("IQ"):
        return _iq_like(data, qtype)
    if qtype not in _WRITERS:
        return gguf.quants.quantize(data, qtype)
    writer, error = _WRITERS[qtype]
    packed = writer(data.reshape(-1, data.shape[-1]))
    decoded = gguf.quants.dequantize(packed, qtype)  # valid blocks, close to the weights
    assert np.sqrt(np.mean((decoded - data.reshape(decoded.shape)) ** 2)) < error * np.sqrt(np.mean(data ** 2))
    return packed.reshape(*data.shape[:-1], -1)


def write_gguf(path, net, types: dict, arch="diffusion_gemma", split_experts=False, extra=None):
    """Write `net` as a GGUF file; `types` maps a weight kind ("attn", "mlp", "gate_up", "down", "embed"; with
    `split_experts`, "gate" and "up" may override "gate_up" for either half) to its GGML type, everything 1-D is F32;
    `extra(writer)` may add metadata. Returns a float twin holding exactly the values the file decodes to."""
    cfg = net.config
    twin = copy.deepcopy(net)
    state = twin.state_dict()
    w = gguf.GGUFWriter(str(path), arch)
    a = arch + "."
    for key, value in [("block_count", cfg.num_hidden_layers), ("embedding_length", cfg.hidden_size),
                       ("feed_forward_length", cfg.intermediate_size), ("expert_count", cfg.num_experts),
                       ("expert_used_count", cfg.top_k_experts),
                       ("expert_feed_forward_length", cfg.moe_intermediate_size),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.sliding_window", cfg.sliding_window), ("context_length", 4096),
                       ("canvas_length", cfg.canvas_length),
                       ("attention.key_length", max(cfg.layer_head_dims)),
                       ("attention.key_length_swa", min(cfg.layer_head_dims))]:
        w.add_uint32(a + key, value)
    w.add_array(a + "attention.head_count_kv", list(cfg.layer_kv_heads))
    w.add_array(a + "attention.sliding_window_pattern", [t == SLIDING for t in cfg.layer_types])
    w.add_float32(a + "attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)

    def add(name, tensor, kind, ours):
        qtype = types.get(kind, Q.F32) if tensor.dim() > 1 else Q.F32
        data = tensor.float().numpy()
        if qtype == Q.F32:
            w.add_tensor(name, data)
            return torch.from_numpy(data)
        packed = _quantize(data, qtype)
        w.add_tensor(name, packed, raw_dtype=qtype)
        return torch.from_numpy(gguf.quants.dequantize(packed, qtype))

    for ours, tensor in net.state_dict().items():
        if ours.endswith("_layer_scalars"):
            if ours.startswith("decoder"):
                for i, value in enumerate(tensor):
                    w.add_tensor(f"blk.{i}.layer_output_scale.weight", value.reshape(1).float().numpy())
            continue
        kind = ("embed" if "embed" in ours else "gate_up" if "gate_up" in ours else "down" if "experts" in ours
                else "attn" if "self_attn" in ours else "mlp")
        if split_experts and ours.endswith("gate_up_proj"):
            layer = ours.split(".")[1]
            gate, up = tensor.chunk(2, dim=1)
            halves = [add(f"blk.{layer}.ffn_{half}_exps.weight", value.contiguous(), half if half in types else kind,
                          ours) for half, value in (("gate", gate), ("up", up))]
            state[ours].copy_(torch.cat(halves, 1))
            continue
        state[ours].copy_(add(_gguf_name(ours), tensor, kind, ours))
    if extra is not None:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return twin


@pytest.fixture(scope="module")
def tiny_net():
    net = _realistic(preset("tiny"))
    net.encoder_layer_scalars.copy_(net.decoder_layer_scalars)  # the file stores one scalar per layer
    return net


def _logits(model):
    gen = torch.Generator().manual_seed(9)
    return model.canvas_logits(torch.randint(3, 512, (1, 12), generator=gen), torch.randint(0, 512, (1, 32),
                                                                                         generator=gen))


@pytest.mark.parametrize("types, split, kinds", [
    ({"attn": Q.Q8_0, "mlp": Q.Q8_0, "gate_up": Q.Q8_0, "down": Q.Q8_0, "embed": Q.Q8_0}, True, ("int8", "int8")),
    ({"attn": Q.Q4_0, "mlp": Q.Q5_0, "gate_up": Q.Q4_0, "down": Q.Q4_1, "embed": Q.Q8_0}, False, ("int4", "int4")),
    # experts in MXFP4, as llama.cpp's MXFP4_MOE files hold them (written by the package's own quantizer)
    ({"attn": Q.Q8_0, "mlp": Q.Q8_0, "gate_up": Q.MXFP4, "down": Q.MXFP4, "embed": Q.Q8_0}, True, ("int8", "int8")),
])
def test_gguf_loads_and_matches_the_decoded_weights(tiny_net, tmp_path, types, split, kinds, float32_products):
    path = tmp_path / "model.gguf"
    twin = write_gguf(path, tiny_net, types, split_experts=split)
    model = dgemma.load(path)
    assert model.config == tiny_net.config and model.tokenizer is None
    experts = model.net.layers[0].experts
    assert (experts.qtensor("gate_up_proj").kind, experts.qtensor("down_proj").kind) == kinds
    assert experts.qtensor("gate_up_proj").group_size == 32
    torch.testing.assert_close(_logits(model), _logits(Model(twin)), rtol=1e-4, atol=1e-4)
    assert model.parameter_bytes() < Model(tiny_net).parameter_bytes() / 2  # float32 twin


@pytest.mark.skipif(not int4_cpu._capable(), reason="no AVX2 or AVX-512 int4 kernel on this CPU")
def test_gguf_int4_experts_take_the_cpu_int4_kernel(tiny_net, tmp_path, monkeypatch):
    """Q4_0 gate/up experts beside Q8_0 down ones (int4 next to int8): the int4 half is stored in the kernel's order
    and the logits stay those of the dequantizing path."""
    path = tmp_path / "model.gguf"
    write_gguf(path, tiny_net, {"attn": Q.Q8_0, "mlp": Q.Q8_0, "gate_up": Q.Q4_0, "down": Q.Q8_0, "embed": Q.Q8_0},
               split_experts=True)
    model = dgemma.load(path)
    assert model.net.layers[0].experts._kernel_layout == {"gate_up_proj"}
    monkeypatch.setattr(int4_cpu, "ENABLED", False)
    plain = dgemma.load(path)
    assert not plain.net.layers[0].experts._kernel_layout
    out, ref = _logits(model), _logits(plain)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item() > 0.9999


def test_a_gguf_model_takes_text_with_a_tokenizer_from_a_directory(tiny_net, tmp_path, float32_products):
    from dgemma import checkpoint
    from dgemma.config import GenerationSettings
    from dgemma.tokenizer import Tokenizer

    path = tmp_path / "model.gguf"
    twin = write_gguf(path, tiny_net, {"attn": Q.Q8_0, "gate_up": Q.Q8_0, "down": Q.Q8_0})
    tok_dir = checkpoint.save(twin, GenerationSettings(), tmp_path / "twin", tokenizer=Tokenizer.byte_level())
    model = dgemma.load(path, tokenizer=tok_dir)
    assert dgemma.load(path).tokenizer is None and model.tokenizer is not None
    kw = dict(max_new_tokens=8, max_denoising_steps=3, seed=0)
    assert model.complete("def f(x):", **kw).result.token_ids == \
        dgemma.load(tok_dir).complete("def f(x):", **kw).result.token_ids


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE of 400 ids (the bundled model's kind of tokenizer), trained on text made here."""
    from dgemma.tokenizer import Tokenizer

    lines = [f"def f{i}(x, y):\n    return x * {i} + y  # caf\u00e9 {i % 7}\n" for i in range(300)]
    return Tokenizer.train_bpe(lines, 400)


def _gpt2_vocabulary(tok, pre="gpt-2", mangle=lambda lists: None):
    """llama.cpp's metadata for a byte-level BPE: model "gpt2", tokens by id, merges "a b", token types; `mangle`
    may change the {"tokens", "merges", "types"} lists first."""
    from dgemma.tokenizer import BYTE_SPECIALS

    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    lists = {"tokens": tokens, "types": [gguf.TokenType.CONTROL if t in BYTE_SPECIALS else gguf.TokenType.NORMAL
                                         for t in tokens],
             "merges": [m if isinstance(m, str) else " ".join(m)
                        for m in json.loads(tok.backend.to_str())["model"]["merges"]]}
    mangle(lists)

    def extra(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_bos_token_id(2)
        w.add_pad_token_id(0)
        w.add_token_list(lists["tokens"])
        w.add_token_merges(lists["merges"])
        w.add_token_types(lists["types"])
        w.add_chat_template(tok.chat_template)
    return extra


@pytest.mark.parametrize("layout", ["gpt2", "huggingface.json"])
def test_a_gguf_files_own_tokenizer_is_read(tiny_net, tmp_path, bpe, layout, capsys):
    path = tmp_path / "model.gguf"
    extra = _gpt2_vocabulary(bpe) if layout == "gpt2" else \
        (lambda w: w.add_string("tokenizer.huggingface.json", bpe.backend.to_str()))
    write_gguf(path, tiny_net, {"attn": Q.Q8_0}, extra=extra)
    tok = dgemma.load(path).tokenizer
    assert tok is not None and tok.vocab_size == bpe.vocab_size
    texts = ["def f12(x, y):\n    return x * 12 + y", "caf\u00e9 \u2603 \U0001f600\t\r\n  spaced  ", "<|turn>user\nhi<turn|>",
             "<bos>x<eos> <pad>", ""]
    for text in texts:
        assert tok.encode(text) == bpe.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    # The file's special ids: the gpt2 file names BOS and padding; the other names neither, so none is assumed.
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == ((2, [1], 0) if layout == "gpt2" else
                                                                       (None, [1], None))
    # Converted to a quantized directory, the file's tokenizer goes along.
    dgemma.quant.quantize(path, tmp_path / "q", "int8", progress=False)
    assert dgemma.load(tmp_path / "q").tokenizer.encode(texts[0]) == bpe.encode(texts[0])
    if layout == "gpt2":
        messages = [{"role": "user", "content": "hello"}]
        assert tok.chat_template == bpe.chat_template and tok.encode_chat(messages) == bpe.encode_chat(messages)
        from dgemma.cli import main

        assert main(["info", "--model", str(path), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["tokenizer"] is True and info["chat_template"] is True


# A SentencePiece BPE vocabulary as llama.cpp writes Gemma's ("llama"): specials, byte pieces, characters, then
# pieces of up to 5 characters made of them, with random distinct scores (so ties never decide).
_SPM_CHARS = list("\u2581abcdefghij(),:=\n")


def _spm_vocabulary(seed=0):
    rng = np.random.default_rng(seed)
    multi = sorted({"".join(rng.choice(_SPM_CHARS, rng.integers(2, 6))) for _ in range(260)})
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        _SPM_CHARS + multi[:512 - 262 - len(_SPM_CHARS)]
    kinds = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN] + [gguf.TokenType.USER_DEFINED] * 2 + \
        [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (len(pieces) - 262)
    scores = [0.0] * 262 + rng.permutation(len(pieces) - 262).astype(float).tolist()
    return pieces, kinds, scores


def _spm_reference(text, pieces, kinds, scores, add_space_prefix):
    """SentencePiece BPE as llama.cpp runs it, written out plainly: control and user-defined pieces are cut out
    whole; each stretch of text between them (with the prefix, after a "\u2581" put before it, as llama.cpp does at
    the start and after every such piece), spaces as "\u2581", starts as characters; the adjacent pair whose
    concatenation is the highest-scoring ordinary piece merges (leftmost among equals), until none does; a leftover
    character with no piece becomes its UTF-8 byte pieces."""
    ids = {p: i for i, p in enumerate(pieces)}
    ordinary = {p: s for p, k, s in zip(pieces, kinds, scores) if k == gguf.TokenType.NORMAL}
    whole = [p for p, k in zip(pieces, kinds) if k in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    out, after_whole = [], True
    for part in re.split("(" + "|".join(map(re.escape, whole)) + ")", text):
        if part in whole:
            out.append(ids[part])
            after_whole = True
        elif part:
            symbols = list(("\u2581" if add_space_prefix and after_whole else "") + part.replace(" ", "\u2581"))
            after_whole = False
            while True:
                pairs = [(ordinary[a + b], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))
                         if a + b in ordinary]
                if not pairs:
                    break
                i = -max(pairs)[1]
                symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
            for sym in symbols:
                out.extend([ids[sym]] if sym in ids else [ids[f"<0x{b:02X}>"] for b in sym.encode()])
    return out


@pytest.mark.parametrize("add_space_prefix", [False, True])
def test_a_gguf_sentencepiece_vocabulary_tokenizes_as_sentencepiece_does(tiny_net, tmp_path, add_space_prefix):
    pieces, kinds, scores = _spm_vocabulary()

    def llama(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(pieces)
        w.add_token_types(kinds)
        w.add_token_scores(scores)
        w.add_add_space_prefix(add_space_prefix)
        w.add_bos_token_id(2)
    path = tmp_path / "model.gguf"
    write_gguf(path, tiny_net, {"attn": Q.Q8_0}, extra=llama)
    tok = dgemma.load(path).tokenizer
    assert tok is not None and tok.vocab_size == 512 and tok.bos_token_id == 2
    rng = np.random.default_rng(1)
    alphabet = _SPM_CHARS[1:] + list(" xyz\u00e9\u2603")  # and characters with no piece: byte fallback
    texts = ["".join(rng.choice(alphabet, rng.integers(0, 40))) for _ in range(200)]
    texts += ["a<|turn>b c<turn|>", "<bos>abc", "  leading and trailing  "]
    for text in texts:
        want = _spm_reference(text, pieces, kinds, scores, add_space_prefix)
        assert tok.encode(text) == want, text
        # The prefix put after a control or user-defined piece stays in the decoded text, as in llama.cpp's.
        if not (add_space_prefix and "<" in text):
            assert tok.decode(want, skip_special_tokens=False) == text, text


def test_other_gguf_vocabularies_are_not_read(tiny_net, tmp_path, capsys, bpe):
    """Byte-level vocabularies with llama.cpp's "default" pre-tokenizer (which splits digits and punctuation apart,
    unlike GPT-2's) and others (here WordPiece) load without a tokenizer."""
    from dgemma.cli import main

    def bert(w):
        w.add_tokenizer_model("bert")
        w.add_token_list(["[PAD]", "[UNK]", "a", "##b"])

    for name, extra in (("bert", bert), ("default", _gpt2_vocabulary(bpe, pre="default"))):
        path = tmp_path / f"{name}.gguf"
        write_gguf(path, tiny_net, {"attn": Q.Q8_0}, extra=extra)
        assert dgemma.load(path).tokenizer is None, name
        assert main(["run", "hello", "--model", str(path)]) == 2
        assert "pass a tokenizer with --tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("fault", ["merge", "types", "repeat", "json"])
def test_malformed_gguf_tokenizer_metadata_is_named_and_can_be_replaced(tiny_net, tmp_path, capsys, bpe, fault):
    from dgemma.cli import main

    def mangle(lists):
        if fault == "merge":
            lists["merges"][-1] = "nospace"
        elif fault == "types":
            del lists["types"][-5:]
        else:
            lists["tokens"][-1] = lists["tokens"][-2]

    broken = (lambda w: w.add_string("tokenizer.huggingface.json", "{not json")) if fault == "json" else \
        _gpt2_vocabulary(bpe, mangle=mangle)
    path = tmp_path / "model.gguf"
    write_gguf(path, tiny_net, {"attn": Q.Q8_0}, extra=broken)
    with pytest.raises(ValueError, match="malformed tokenizer metadata"):
        dgemma.load(path)
    # Another tokenizer takes the file's place: its metadata is not read at all.
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    bpe.save(tok_dir)
    assert main(["run", "hello", "--model", str(path), "--tokenizer", str(tok_dir), "--max-new-tokens", "4",
                 "--steps", "2"]) == 0


def test_gguf_can_be_converted_to_a_quantized_directory(tiny_net, tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_net, {"attn": Q.Q8_0, "gate_up": Q.Q8_0, "down": Q.Q8_0})
    dgemma.quant.quantize(tmp_path / "m.gguf", tmp_path / "q", "int8", progress=False)
    a, b = _logits(dgemma.load(tmp_path / "q")), _logits(dgemma.load(tmp_path / "m.gguf"))
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_an_f16_gguf_loads_in_float32_as_dgemma_info_counts_it(tiny_net, tmp_path, capsys):
    from dgemma.cli import main

    kinds = ("attn", "mlp", "gate_up", "down", "embed")
    write_gguf(tmp_path / "m.gguf", tiny_net, dict.fromkeys(kinds, Q.F16))
    model = dgemma.load(tmp_path / "m.gguf")
    assert model.dtype == torch.float32  # not the file's float16, slow on CPUs
    assert main(["info", "--model", str(tmp_path / "m.gguf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "float32" and info["resident_bytes"] == model.parameter_bytes()
    assert dgemma.load(tmp_path / "m.gguf", dtype="float16").dtype == torch.float16  # when asked
    assert main(["info", "--model", str(tmp_path / "m.gguf"), "--device", "cuda", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"  # what a GPU load takes


def test_gguf_conversion_progress_totals_what_loading_yields(wide_net, tmp_path):
    from dgemma.quant.gguf import GGUFFile

    # Types whose loaded bytes differ from the file's: Q3_K and IQ2_XS grow when repacked, an F16 gate with a Q6_K
    # up and TQ2_0 are decoded to float.
    types = {"attn": Q.Q8_0, "mlp": Q.IQ2_XS, "gate": Q.F16, "up": Q.Q6_K, "down": Q.Q3_K, "embed": Q.TQ2_0}
    write_gguf(tmp_path / "m.gguf", wide_net, types, split_experts=True)
    summary = dgemma.quant.quantize(tmp_path / "m.gguf", tmp_path / "q", "int8", progress=False)
    source = GGUFFile(tmp_path / "m.gguf")
    assert summary["source_bytes"] == source.total_bytes  # the bar's total is what its updates add up to
    assert source.total_bytes > sum(int(t.n_bytes) for t in source.reader.tensors)


def test_gguf_unknown_architecture_is_refused(tiny_net, tmp_path):
    write_gguf(tmp_path / "llama.gguf", tiny_net, {}, arch="llama")
    with pytest.raises(ValueError, match="architecture 'llama' is not supported.*'diffusion_gemma'"):
        dgemma.load(tmp_path / "llama.gguf")


def test_gguf_unknown_or_undecodable_tensor_type_is_refused(tiny_net, tmp_path):
    path = tmp_path / "odd.gguf"
    write_gguf(path, tiny_net, {})
    raw = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = raw.index(name) + len(name)  # then: n_dims u32, dims u64 x n_dims, type u32
    n_dims = int.from_bytes(raw[at:at + 4], "little")
    at += 4 + 8 * n_dims
    raw[at:at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="unknown GGML type"):
        dgemma.load(path)

    # Q8_1 is a known type that the gguf package cannot decode.
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "diffusion_gemma")
    w.add_tensor("token_embd.weight", np.zeros((4, 40), dtype=np.uint8), raw_dtype=Q.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="token_embd.weight' has GGML type Q8_1, which the gguf package cannot"):
        dgemma.load(tmp_path / "q81.gguf")


# Random but valid blocks: any bytes, with the float16 scales (and minimums) set to chosen finite values.
def _random_blocks(qtype, lead, k, halves: dict, seed=0) -> np.ndarray:
    """uint8 [*lead, k / block weights * block bytes] of random blocks; `halves` maps a byte offset to a float16
    value."""
    weights, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.random.default_rng(seed).integers(0, 256, (*lead, k // weights, size), dtype=np.uint8)
    for at, value in halves.items():
        blocks[..., at:at + 2] = _half_bytes(value).reshape(2)
    return blocks.reshape(*lead, -1)


@pytest.mark.parametrize("d, dmin", [(2.0**-7, 2.0**-9), (0.01234, 0.00456), (3.1, 70.0)])
@pytest.mark.parametrize("qtype, kind, top", [(Q.Q4_K, "int4", 15), (Q.Q5_K, "int8", 31)])
def test_k_quants_with_minimums_repack_into_groups_of_32(qtype, kind, top, d, dmin):
    from dgemma.quant.formats import dequantize
    from dgemma.quant.gguf import _REPACKED

    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = _random_blocks(qtype, (2, 3), 512, {0: d, 2: dmin})
    q = _REPACKED[qtype.name](torch.from_numpy(raw).unflatten(-1, (2, size)))
    assert (q.kind, q.group_size, tuple(q.shape)) == (kind, 32, (2, 3, 512))
    assert q.scale.dtype == q.offset.dtype == torch.float16
    # Scales and offsets: the products d * sc and -dmin * m, rounded to float16.
    sc, m = gguf.quants.Q4_K.get_scale_min(raw.reshape(-1, size)[:, 4:16])  # [blocks, 8] each
    d32, dmin32 = np.float32(np.float16(d)), np.float32(np.float16(dmin))
    np.testing.assert_array_equal(q.scale.numpy().reshape(-1, 8), (d32 * sc.astype(np.float32)).astype(np.float16))
    np.testing.assert_array_equal(q.offset.numpy().reshape(-1, 8), (-dmin32 * m.astype(np.float32)).astype(np.float16))
    ours = dequantize(q).numpy()
    ref = gguf.quants.dequantize(raw, qtype)  # [2, 3, 512]
    if d == 2.0**-7:  # power-of-two scales: the products are exact in float16, so are the values
        np.testing.assert_array_equal(ours, ref)
    # Elsewhere within the float16 rounding of scale (times a code <= top) and offset: a misplaced bit, nibble or
    # sub-block is off by at least one scale step, i.e. 2^11 / top times more.
    scale = np.repeat(d32 * sc.astype(np.float32), 32, -1).reshape(ref.shape)
    offset = np.repeat(dmin32 * m.astype(np.float32), 32, -1).reshape(ref.shape)
    bound = 2.0**-11 * (top * scale + offset) * (1 + 1e-6) + 1e-6 * np.abs(ref)
    assert np.all(np.abs(ours - ref) <= bound)


@pytest.mark.parametrize("qtype, halves", [(Q.Q5_0, {0: 0.01234}), (Q.Q5_1, {0: 0.01234, 2: -0.2}),
                                           (Q.Q5_1, {0: 3.1, 2: 70.0})])
def test_q5_0_and_q5_1_blocks_repack_into_int8_groups_of_32_exactly(qtype, halves):
    from dgemma.quant.formats import dequantize
    from dgemma.quant.gguf import _REPACKED

    raw = _random_blocks(qtype, (2, 3), 128, halves, seed=4)
    q = _REPACKED[qtype.name](torch.from_numpy(raw).unflatten(-1, (4, -1)))
    assert (q.kind, q.group_size, tuple(q.shape), q.scale.dtype) == ("int8", 32, (2, 3, 128), torch.float16)
    assert (q.offset is None) == (qtype == Q.Q5_0)
    assert q.codes.min() >= (-16 if q.offset is None else 0) and q.codes.max() <= (15 if q.offset is None else 31)
    np.testing.assert_array_equal(dequantize(q).numpy(), gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("d", [0.01234, 2.0**-20, 1000.0])
def test_q6_k_blocks_repack_into_int8_groups_of_16_exactly(d):
    from dgemma.quant.formats import dequantize
    from dgemma.quant.gguf import _q6_k

    raw = _random_blocks(Q.Q6_K, (2, 3), 768, {208: d}, seed=1)
    q = _q6_k(torch.from_numpy(raw).unflatten(-1, (3, 210)))
    assert (q.kind, q.group_size, tuple(q.shape), q.scale.dtype) == ("int8", 16, (2, 3, 768), torch.float32)
    assert q.offset is None and q.codes.min() >= -32 and q.codes.max() <= 31
    np.testing.assert_array_equal(dequantize(q).numpy(), gguf.quants.dequantize(raw, Q.Q6_K))


@pytest.mark.parametrize("d, dmin", [(2.0**-7, 2.0**-9), (0.01234, 0.00456), (3.1, 70.0), (3000.0, 6000.0)])
@pytest.mark.parametrize("qtype", [Q.Q3_K, Q.Q2_K])
def test_q2_k_and_q3_k_blocks_repack_into_int4_groups_of_16(qtype, d, dmin):
    from dgemma.quant.formats import dequantize
    from dgemma.quant.gguf import _REPACKED

    size = gguf.GGML_QUANT_SIZES[qtype][1]
    halves = {108: d} if qtype == Q.Q3_K else {80: d, 82: dmin}
    raw = _random_blocks(qtype, (2, 3), 512, halves, seed=7)
    q = _REPACKED[qtype.name](torch.from_numpy(raw).unflatten(-1, (2, size)))
    assert (q.kind, q.group_size, tuple(q.shape)) == ("int4", 16, (2, 3, 512))
    # float16 scales and offsets, float32 where some would overflow float16 (65504; a Q3_K offset is 4 * 31 * d)
    exact = d == 2.0**-7 or d == 3000.0
    assert q.scale.dtype == q.offset.dtype == (torch.float32 if d == 3000.0 else torch.float16)
    codes = dequantize(QTensor("int4", q.codes, torch.ones_like(q.scale), torch.zeros_like(q.offset)))
    assert codes.max() <= (7 if qtype == Q.Q3_K else 3)
    ref = gguf.quants.dequantize(raw, qtype)  # [2, 3, 512]
    ours = dequantize(q).numpy()
    # Each sub-block of 16 weights is affine in its codes: ref = a * code + b with a = d * (sc - 32), b = -4a (Q3_K)
    # or a = d * (sc & 15), b = -dmin * (sc >> 4) (Q2_K); both rounded to float16 here.
    blocks = raw.reshape(-1, size)
    if qtype == Q.Q3_K:
        top = (blocks[:, 104:108][:, None, :] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # [blocks, 4, 4]
        six = np.concatenate([blocks[:, 96:104] & 15, blocks[:, 96:104] >> 4], -1) | (top.reshape(-1, 16) << 4)
        a = np.float32(np.float16(d)) * (six.astype(np.float32) - 32)
        b = -4 * a
    else:
        a = np.float32(np.float16(d)) * (blocks[:, :16] & 15).astype(np.float32)
        b = -np.float32(np.float16(dmin)) * (blocks[:, :16] >> 4).astype(np.float32)
    np.testing.assert_array_equal(q.scale.numpy().reshape(-1, 16), a.astype(q.scale.numpy().dtype))
    np.testing.assert_array_equal(q.offset.numpy().reshape(-1, 16), b.astype(q.offset.numpy().dtype))
    if exact:  # power-of-two float16 scales, or float32 ones: the products are exact, so are the values
        np.testing.assert_array_equal(ours, ref)
    # Elsewhere within the float16 rounding of a (times a code <= 7) and b: a misplaced bit or sub-block is off by
    # at least one step a.
    a, b = (np.repeat(np.abs(v), 16, -1).reshape(ref.shape) for v in (a, b))
    bound = 2.0**-11 * (7 * a + b) * (1 + 1e-6) + 1e-6 * np.abs(ref)
    assert np.all(np.abs(ours - ref) <= bound)


# IQ types: the format they load as, its group size and scale dtype, and the largest code magnitude (int8) or code
# (int4) their tables hold.
_IQ = {Q.IQ4_NL: ("int8", 32, torch.float16, 127), Q.IQ4_XS: ("int8", 32, torch.float32, 127),
       Q.IQ2_XXS: ("int8", 32, torch.float32, 43), Q.IQ2_XS: ("int8", 16, torch.float32, 43),
       Q.IQ2_S: ("int8", 16, torch.float32, 43), Q.IQ3_XXS: ("int8", 32, torch.float32, 62),
       Q.IQ3_S: ("int4", 32, torch.float16, 15), Q.IQ1_S: ("int4", 32, torch.float16, 2),
       Q.IQ1_M: ("int8", 16, torch.float32, 9)}


@pytest.mark.parametrize("d", [0.01234, 2.0**-20, 1000.0])
@pytest.mark.parametrize("qtype", list(_IQ))
def test_iq_blocks_become_int8_codes_that_decode_exactly(qtype, d, monkeypatch):
    from dgemma.quant import gguf as ours
    from dgemma.quant.formats import dequantize

    monkeypatch.setattr(ours, "_DECODE_ELEMENTS", 600)  # decode two or three rows at a time
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = _iq_blocks(qtype, (2, 3), 512, d, seed=11)
    # The first block of row 0 with scale 0, as llama.cpp writes blocks of zero weights: its values are 0.
    raw.reshape(6, -1, size)[0, 0] = _iq_blocks(qtype, (2, 3), 512, 0.0, seed=11).reshape(6, -1, size)[0, 0]
    blocks = torch.from_numpy(raw).unflatten(-1, (-1, size))
    if qtype.name in ours._REPACKED:  # IQ4: codes from the table by index, without the package
        q = ours._REPACKED[qtype.name](blocks)
    else:  # lattice types: the package decodes, the block scales divide
        q = ours._stepped(qtype.name, blocks, raw.reshape(6, -1))
    kind, group, scale_dtype, top = _IQ[qtype]
    if qtype == Q.IQ3_S and d == 1000.0:
        scale_dtype = torch.float32  # offsets up to 15 * 31 * d overflow float16, so both stay float32
    assert (q.kind, q.group_size, tuple(q.shape), q.scale.dtype) == (kind, group, (2, 3, 512), scale_dtype)
    ref = gguf.quants.dequantize(raw, qtype)
    assert not ref.reshape(6, -1)[0, :gguf.GGML_QUANT_SIZES[qtype][0]].any()
    if kind == "int8":
        assert q.offset is None and int(q.codes.abs().max()) == top  # steps read right: codes span the type's table
        np.testing.assert_array_equal(dequantize(q).numpy(), ref)
        return
    # int4: the codes span 0..top; scale and offset per group are the step times the spacing and the lowest integer,
    # rounded to float16, so values agree within that rounding. A misread step, spacing or lowest integer is off by
    # at least a step, 2^11 / 15 times more.
    codes = dequantize(QTensor("int4", q.codes, torch.ones_like(q.scale), torch.zeros_like(q.offset)))
    assert int(codes.min()) == 0 and int(codes.max()) == top
    scale = np.repeat(q.scale.float().numpy(), group, -1)
    offset = np.repeat(q.offset.float().numpy(), group, -1)
    bound = 2.0**-11 * (top * np.abs(scale) + np.abs(offset)) * (1 + 1e-3) + 1e-6 * np.abs(ref)
    assert np.all(np.abs(dequantize(q).numpy() - ref) <= bound)


def test_mxfp4_blocks_become_int8_codes_that_decode_exactly():
    from dgemma.quant.formats import dequantize
    from dgemma.quant.gguf import _mxfp4

    raw = np.random.default_rng(16).integers(0, 256, (2, 128, 17), dtype=np.uint8)
    raw[..., 0] = np.arange(256, dtype=np.uint8).reshape(2, 128)  # every exponent byte, 255's products overflowing
    q = _mxfp4(torch.from_numpy(raw))
    assert (q.kind, q.group_size, tuple(q.shape), q.scale.dtype, q.offset) == ("int8", 32, (2, 4096), torch.float32,
                                                                               None)
    assert int(q.codes.abs().max()) == 12  # twice FP4's largest magnitude, 6
    with np.errstate(over="ignore"):
        ref = gguf.quants.dequantize(raw.reshape(2, -1), Q.MXFP4)
    np.testing.assert_array_equal(dequantize(q).numpy(), ref)


def test_iq_values_that_are_not_multiples_of_their_steps_are_refused(wide_net, tmp_path, monkeypatch):
    from dgemma.quant import gguf as ours

    path = tmp_path / "model.gguf"
    write_gguf(path, wide_net, {"attn": Q.Q8_0, "gate_up": Q.IQ3_S, "down": Q.IQ3_S})
    group, step, affine = ours._STEPPED["IQ3_S"]
    monkeypatch.setitem(ours._STEPPED, "IQ3_S", (group, lambda b: step(b) * 3, affine))  # a misread scale
    with pytest.raises(ValueError, match=r"IQ3_S tensor 'blk\.0\..*' decodes to values that are not the whole multi"):
        dgemma.load(path)
    # Steps half as large: the quotients are whole (and exact), but even, not the odd numbers -15..15 that int4
    # codes stand for.
    monkeypatch.setitem(ours._STEPPED, "IQ3_S", (group, lambda b: step(b) / 2, affine))
    with pytest.raises(ValueError, match=r"IQ3_S tensor 'blk\.0\..*' decodes to values that are not the whole multi"):
        dgemma.load(path)


def test_int4_experts_of_different_groups_fuse_into_the_smaller_groups():
    from dgemma.quant.formats import dequantize
    from dgemma.quant.gguf import _fuse, _q3_k, _q4_k

    gate_raw = _random_blocks(Q.Q4_K, (2, 3), 256, {0: 2.0**-7, 2: 2.0**-9}, seed=8)
    up_raw = _random_blocks(Q.Q3_K, (2, 3), 256, {108: 2.0**-6}, seed=9)
    fused = _fuse(_q4_k(torch.from_numpy(gate_raw).unflatten(-1, (1, 144))),
                  _q3_k(torch.from_numpy(up_raw).unflatten(-1, (1, 110))))
    assert (fused.kind, fused.group_size, tuple(fused.shape)) == ("int4", 16, (2, 6, 256))
    expected = np.concatenate([gguf.quants.dequantize(gate_raw, Q.Q4_K), gguf.quants.dequantize(up_raw, Q.Q3_K)], 1)
    np.testing.assert_array_equal(dequantize(fused).numpy(), expected)


def test_int4_and_int8_experts_fuse_into_int8():
    from dgemma.quant.formats import dequantize
    from dgemma.quant.gguf import _fuse, _q3_k, _q8_0

    gate_raw = _random_blocks(Q.Q3_K, (2, 3), 256, {108: 2.0**-6}, seed=12)
    up_float = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(13))
    up_raw = gguf.quants.quantize(up_float.numpy(), Q.Q8_0)
    fused = _fuse(_q3_k(torch.from_numpy(gate_raw).unflatten(-1, (1, 110))),
                  _q8_0(torch.from_numpy(up_raw).unflatten(-1, (-1, 34))))
    assert (fused.kind, fused.group_size, tuple(fused.shape)) == ("int8", 16, (2, 6, 256))
    assert int(fused.codes[:, :3].min()) >= 0 and int(fused.codes[:, :3].max()) <= 7  # Q3_K's codes, as they were
    expected = np.concatenate([gguf.quants.dequantize(gate_raw, Q.Q3_K), gguf.quants.dequantize(up_raw, Q.Q8_0)], 1)
    np.testing.assert_array_equal(dequantize(fused).numpy(), expected)


def test_q5_k_and_q6_k_experts_fuse_into_int8_with_offsets():
    from dgemma.quant.formats import dequantize
    from dgemma.quant.gguf import _fuse, _q5_k, _q6_k

    gate_raw = _random_blocks(Q.Q5_K, (2, 3), 256, {0: 2.0**-7, 2: 2.0**-9}, seed=5)
    up_raw = _random_blocks(Q.Q6_K, (2, 3), 256, {208: 0.01}, seed=6)
    fused = _fuse(_q5_k(torch.from_numpy(gate_raw).unflatten(-1, (1, 176))),
                  _q6_k(torch.from_numpy(up_raw).unflatten(-1, (1, 210))))
    assert (fused.kind, fused.group_size, tuple(fused.shape)) == ("int8", 16, (2, 6, 256))
    assert torch.all(fused.offset[:, 3:] == 0) and fused.offset.dtype == torch.float16  # Q6_K's half has no minimum
    expected = np.concatenate([gguf.quants.dequantize(gate_raw, Q.Q5_K), gguf.quants.dequantize(up_raw, Q.Q6_K)], 1)
    np.testing.assert_array_equal(dequantize(fused).numpy(), expected)


def test_q6_k_and_q8_0_experts_fuse_into_int8():
    from dgemma.quant.formats import dequantize
    from dgemma.quant.gguf import _fuse, _q6_k

    gate_raw = _random_blocks(Q.Q6_K, (2, 3), 256, {208: 0.01}, seed=2)
    gate = _q6_k(torch.from_numpy(gate_raw).unflatten(-1, (1, 210)))
    up_float = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(3))
    up_raw = gguf.quants.quantize(up_float.numpy(), Q.Q8_0)
    blocks = torch.from_numpy(up_raw).unflatten(-1, (-1, 34))
    up = dgemma.quant.QTensor("int8", blocks[..., 2:].contiguous().view(torch.int8).flatten(-2),
                              blocks[..., :2].contiguous().view(torch.float16).squeeze(-1))
    fused = _fuse(gate, up)
    assert (fused.kind, fused.group_size, tuple(fused.shape), fused.scale.dtype) == ("int8", 16, (2, 6, 256),
                                                                                     torch.float32)
    expected = np.concatenate([gguf.quants.dequantize(gate_raw, Q.Q6_K), gguf.quants.dequantize(up_raw, Q.Q8_0)], 1)
    np.testing.assert_array_equal(dequantize(fused).numpy(), expected)


@pytest.fixture(scope="module")
def wide_net():
    """The tiny model with every input width but attention's output a multiple of 256, as K-quants need."""
    net = _realistic(preset("tiny", hidden_size=256, intermediate_size=256, moe_intermediate_size=256))
    net.encoder_layer_scalars.copy_(net.decoder_layer_scalars)
    return net


@pytest.mark.parametrize("types, split", [
    ({"attn": Q.Q8_0, "mlp": Q.Q6_K, "gate_up": Q.Q4_K, "down": Q.Q6_K, "embed": Q.Q4_K}, True),
    ({"attn": Q.Q4_0, "mlp": Q.Q4_K, "gate_up": Q.Q6_K, "down": Q.Q4_K, "embed": Q.Q6_K}, False),
    ({"attn": Q.Q5_1, "mlp": Q.Q5_K, "gate_up": Q.Q5_K, "down": Q.Q6_K, "embed": Q.Q5_0}, True),
    ({"attn": Q.Q5_0, "mlp": Q.Q5_1, "gate_up": Q.Q5_0, "down": Q.Q5_K, "embed": Q.Q5_K}, False),
    ({"attn": Q.Q4_0, "mlp": Q.Q2_K, "gate_up": Q.Q3_K, "down": Q.Q2_K, "embed": Q.Q3_K}, True),
    ({"attn": Q.Q8_0, "mlp": Q.Q3_K, "gate_up": Q.Q2_K, "down": Q.Q3_K, "embed": Q.Q2_K}, False),
    ({"attn": Q.IQ4_NL, "mlp": Q.IQ2_XS, "gate_up": Q.IQ4_XS, "down": Q.IQ3_XXS, "embed": Q.IQ2_XXS}, False),
    ({"attn": Q.IQ4_NL, "mlp": Q.IQ1_M, "gate_up": Q.IQ3_S, "down": Q.IQ1_S, "embed": Q.IQ2_S}, True),
])
def test_gguf_k_and_iq_quants_load_repacked_and_match_the_decoded_weights(wide_net, tmp_path, types, split,
                                                                          float32_products):
    path = tmp_path / "model.gguf"
    twin = write_gguf(path, wide_net, types, split_experts=split)
    model = dgemma.load(path)
    assert model.config == wide_net.config
    formats = {Q.Q4_K: ("int4", 32, torch.float16), Q.Q6_K: ("int8", 16, torch.float32),
               Q.Q3_K: ("int4", 16, torch.float16), Q.Q2_K: ("int4", 16, torch.float16),
               **{t: ("int8", 32, torch.float16) for t in (Q.Q5_0, Q.Q5_1, Q.Q5_K)},
               **{t: (kind, group, dtype) for t, (kind, group, dtype, _) in _IQ.items()}}
    net, layer = model.net, model.net.layers[1]
    for module, name, kind in [(layer.experts, "gate_up_proj", "gate_up"), (layer.experts, "down_proj", "down"),
                               (layer.mlp.down_proj, "weight", "mlp"), (net.self_conditioning.up_proj, "weight", "mlp"),
                               (net.embed_tokens, "weight", "embed")]:
        q = module.qtensor(name)
        assert q is not None, (name, kind)
        assert (q.kind, q.group_size, q.scale.dtype) == formats[types[kind]]
    torch.testing.assert_close(_logits(model), _logits(Model(twin)), rtol=1e-4, atol=1e-4)
    assert model.parameter_bytes() < Model(wide_net).parameter_bytes() / 2.5  # float32 twin


@pytest.mark.parametrize("types, split", [
    ({"attn": Q.Q8_0, "mlp": Q.Q6_K, "gate_up": Q.Q4_K, "down": Q.Q6_K, "embed": Q.Q4_K}, False),
    ({"attn": Q.Q5_0, "mlp": Q.Q5_1, "gate_up": Q.Q5_K, "down": Q.Q4_1, "embed": Q.Q4_0}, False),
    # gate and up: int4 and int8 (fused into int8), float and int8 (decoded to float), two int4 groups (fused into
    # groups of 16)
    ({"attn": Q.Q8_0, "mlp": Q.Q3_K, "gate": Q.Q4_K, "up": Q.Q6_K, "down": Q.Q2_K, "embed": Q.Q4_K}, True),
    ({"attn": Q.Q8_0, "mlp": Q.Q3_K, "gate": Q.F16, "up": Q.Q6_K, "down": Q.Q2_K, "embed": Q.Q4_K}, True),
    ({"attn": Q.Q4_1, "mlp": Q.Q2_K, "gate": Q.Q4_K, "up": Q.Q3_K, "down": Q.Q3_K, "embed": Q.Q6_K}, True),
    # IQ types, the lattice ones' shapes on the meta device: int8 gate and up in groups of 32 and 16, then an int4
    # gate (IQ3_S) with an int8 up, fused into int8
    ({"attn": Q.IQ4_NL, "mlp": Q.IQ3_S, "gate": Q.IQ3_XXS, "up": Q.IQ1_M, "down": Q.IQ1_S, "embed": Q.IQ2_XXS}, True),
    ({"attn": Q.IQ4_NL, "mlp": Q.IQ2_XS, "gate": Q.IQ3_S, "up": Q.IQ2_S, "down": Q.IQ4_XS, "embed": Q.IQ1_S}, True),
])
def test_info_reports_a_gguf_files_resident_bytes_without_decoding(wide_net, tmp_path, capsys, types, split):
    from dgemma.cli import main

    path = tmp_path / "model.gguf"
    write_gguf(path, wide_net, types, split_experts=split)
    assert main(["info", "--model", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["resident_bytes"] == dgemma.load(path, dtype=torch.float32).parameter_bytes()  # what loading holds
    gate_up = types.get("gate", types.get("gate_up"))
    assert info["quantization"].startswith("GGUF tensors") and f"{gate_up.name} x" in info["quantization"]
    assert info["tokenizer"] is False and (split or info["bytes_per_parameter"] < 1.0)


def test_a_gguf_file_without_the_gguf_package_is_a_clear_cli_error(tmp_path, monkeypatch, capsys):
    from dgemma.cli import main
    from dgemma.quant import gguf as gguf_module

    def missing():
        raise ImportError("reading GGUF files needs the gguf package: pip install 'dgemma[gguf]'")

    monkeypatch.setattr(gguf_module, "_gguf", missing)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert main(["info", "--model", str(path)]) == 2
    assert "dgemma info: error: reading GGUF files needs the gguf package" in capsys.readouterr().err
