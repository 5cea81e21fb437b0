"""GGUF import: files written here with the gguf package from a tiny random model load and match its logits."""

import copy
import re

import numpy as np
import pytest
import torch

import dgemma
from dgemma.api import Model
from dgemma.config import SLIDING, preset
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


def write_gguf(path, net, types: dict, arch="diffusion_gemma", split_experts=False):
    """Write `net` as a GGUF file; `types` maps a weight kind ("attn", "mlp", "gate_up", "down", "embed") to its
    GGML type, everything 1-D is F32. Returns a float twin holding exactly the values the file decodes to."""
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
        packed = gguf.quants.quantize(data, qtype)
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
            state[ours].copy_(torch.cat([add(f"blk.{layer}.ffn_gate_exps.weight", gate.contiguous(), kind, ours),
                                         add(f"blk.{layer}.ffn_up_exps.weight", up.contiguous(), kind, ours)], 1))
            continue
        state[ours].copy_(add(_gguf_name(ours), tensor, kind, ours))
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


def test_gguf_can_be_converted_to_a_quantized_directory(tiny_net, tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_net, {"attn": Q.Q8_0, "gate_up": Q.Q8_0, "down": Q.Q8_0})
    dgemma.quant.quantize(tmp_path / "m.gguf", tmp_path / "q", "int8", progress=False)
    a, b = _logits(dgemma.load(tmp_path / "q")), _logits(dgemma.load(tmp_path / "m.gguf"))
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


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
