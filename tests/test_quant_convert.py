"""Quantized checkpoint directories (streaming conversion, loading, CLI) and FP8 compressed-tensors checkpoints."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgemma
from dgemma import checkpoint
from dgemma.api import Model
from dgemma.cli import main
from dgemma.config import GenerationSettings, preset
from dgemma.quant import dequantize, quantize, quantize_model
from dgemma.quant.convert import resident_bytes
from dgemma.quant.formats import QTensor
from test_quant import _realistic


def _inputs(cfg):
    gen = torch.Generator().manual_seed(3)
    return (torch.randint(3, cfg.vocab_size, (1, 12), generator=gen),
            torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=gen))


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    cfg = preset("tiny")
    net = _realistic(cfg)
    path = checkpoint.save(net, GenerationSettings(max_denoising_steps=7), tmp_path_factory.mktemp("q") / "float")
    return path, net


@pytest.mark.parametrize("fmt, group, dtype, dense", [("int8", None, torch.float32, None),
                                                       ("int4", 32, torch.bfloat16, None),
                                                       ("int4", 64, torch.float32, "int8")])
def test_quantized_directory_round_trip(float_ckpt, tmp_path, fmt, group, dtype, dense):
    src, net = float_ckpt
    if dtype != torch.float32:
        src = checkpoint.save(copy.deepcopy(net).to(dtype), GenerationSettings(max_denoising_steps=7), tmp_path / "src")
    summary = quantize(src, tmp_path / "out", fmt, group, shard_bytes=100_000, progress=False, dense=dense)
    out = tmp_path / "out"
    meta = json.loads((out / "config.json").read_text())["quantization_config"]
    assert meta == {"quant_method": "dgemma", "format": fmt, "group_size": group, "dense": dense or fmt,
                    "embedding": "int8"}
    assert (out / "model.safetensors.index.json").is_file()
    assert all(f.name.startswith("model") for f in out.glob("*.safetensors"))  # no format in file names
    model = dgemma.load(out)
    assert model.dtype == dtype and model.settings.max_denoising_steps == 7
    assert model.net.layers[0].self_attn.q_proj.qtensor("weight").kind == (dense or fmt)
    assert model.net.layers[0].experts.qtensor("gate_up_proj").kind == fmt
    assert model.parameter_bytes() == summary["bytes"] == resident_bytes(model.config, fmt, group, "int8",
                                                                         dtype.itemsize, dense)
    expected = Model(quantize_model(copy.deepcopy(net).to(dtype), fmt, group, dense=dense))
    prompt, canvas = _inputs(model.config)
    torch.testing.assert_close(model.canvas_logits(prompt, canvas), expected.canvas_logits(prompt, canvas),
                               rtol=1e-5, atol=1e-5)


def test_metadata_that_disagrees_with_the_tensors_is_an_error(float_ckpt, tmp_path):
    quantize(float_ckpt[0], tmp_path / "q", "int4", 64, progress=False)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["format"] = "int8"
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError, match="stored as int4, but config.json's quantization_config"):
        dgemma.load(tmp_path / "q")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(tmp_path / "q", tmp_path / "again", "int8", progress=False)
    config["quantization_config"].update(format="int4", dense="int2")
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError, match="quantization_config.dense is 'int2'"):
        dgemma.load(tmp_path / "q")
    del config["quantization_config"]["dense"]  # written before dense layers had their own format: they take int4
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    assert dgemma.load(tmp_path / "q").net.layers[0].mlp.down_proj.qtensor("weight").kind == "int4"
    with pytest.raises(ValueError, match="--dense int4 needs a group size"):
        quantize(float_ckpt[0], tmp_path / "x", "int8", dense="int4", progress=False)


def test_cli_quantize_and_info(float_ckpt, tmp_path, capsys):
    assert main(["quantize", "--model", str(float_ckpt[0]), "--to", "int4", "--group-size", "32",
                 "--out", str(tmp_path / "q4"), "--no-progress"]) == 0
    assert "bytes/parameter" in capsys.readouterr().out
    assert main(["info", "--model", str(tmp_path / "q4"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantization"] == "int4 group 32, embedding int8"
    assert info["bytes_per_parameter"] < 0.8 and info["resident_bytes"] < info["weight_bytes"] / 4
    assert main(["quantize", "--model", str(float_ckpt[0]), "--to", "int4", "--dense", "int8",
                 "--out", str(tmp_path / "q48"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", "--model", str(tmp_path / "q48"), "--json"]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert mixed["quantization"] == "int4 group 64, dense layers int8, embedding int8"
    assert info["resident_bytes"] < mixed["resident_bytes"] < info["weight_bytes"] / 2
    assert main(["info", "--model", str(float_ckpt[0])]) == 0
    assert "bytes/param  4.000" in capsys.readouterr().out
    # From a bfloat16 checkpoint: float32 scales are not what the model's float tensors load as.
    half = tmp_path / "half"
    checkpoint.save(copy.deepcopy(float_ckpt[1]).to(torch.bfloat16), GenerationSettings(), half)
    assert main(["quantize", "--model", str(half), "--to", "int8", "--out", str(tmp_path / "q8h"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", "--model", str(tmp_path / "q8h"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    loaded = dgemma.load(tmp_path / "q8h")
    assert info["dtype"] == "bfloat16" == str(loaded.dtype).removeprefix("torch.")
    assert info["resident_bytes"] == loaded.parameter_bytes()
    with pytest.raises(SystemExit):  # argparse refuses an unknown format
        main(["quantize", "--model", str(float_ckpt[0]), "--to", "int3", "--out", str(tmp_path / "x")])
    assert main(["quantize", "--model", str(tmp_path / "missing"), "--to", "int8", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err


def test_quantize_never_writes_over_an_existing_path(float_ckpt, tmp_path, capsys):
    src = float_ckpt[0]
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("important")
    (tmp_path / "file").write_text("x")
    for out in (src, src.parent, tmp_path / "notes", tmp_path / "file"):  # the source, its parent, a user's files
        assert main(["quantize", "--model", str(src), "--to", "int8", "--out", str(out), "--no-progress"]) == 2
        assert "already exists and is not an empty directory" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert (tmp_path / "notes" / "thesis.txt").read_text() == "important" and (tmp_path / "file").read_text() == "x"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    assert main(["quantize", "--model", str(src), "--to", "int8", "--out", str(tmp_path / "link"), "--no-progress"]) == 2
    assert "is a symbolic link" in capsys.readouterr().err and (tmp_path / "link").is_symlink()
    (tmp_path / "empty").mkdir()
    assert main(["quantize", "--model", str(src), "--to", "int8", "--out", str(tmp_path / "empty"),
                 "--no-progress"]) == 0
    mode = (tmp_path / "empty").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # an ordinary directory's permissions, not a private temporary one's


# ---- FP8 (compressed-tensors, as published for vLLM) -------------------------------------------------------------
def _to_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)


def _write_fp8(src, dst, net):
    """Rewrite a float checkpoint in the compressed-tensors FP8 layout: attention per channel, the dense MLP in
    32x32 blocks, experts as one linear per expert with one scale each; embedding, router and norms left float.
    Returns a float twin holding exactly the FP8 weights' values."""
    tensors = load_file(src / "model.safetensors")
    twin = copy.deepcopy(net)
    state = twin.state_dict()
    out = {}
    for name, t in tensors.items():
        local = name.removeprefix("model.decoder.")
        if ".self_attn." in local and local.endswith("_proj.weight"):
            scale = t.abs().amax(1, keepdim=True) / 448  # [N, 1]
            out[name], out[name + "_scale"] = _to_fp8(t, scale), scale
            out[name.replace(".weight", ".input_scale")] = torch.ones(1)
            state[local].copy_(out[name].float() * scale)
        elif ".mlp." in local:
            blocks = t.view(t.shape[0] // 32, 32, t.shape[1] // 32, 32)
            scale = blocks.abs().amax((1, 3)) / 448  # [N/32, K/32]
            full = scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
            out[name], out[name + "_scale"] = _to_fp8(t, full), scale
            state[local].copy_(out[name].float() * full)
        elif local.endswith(("experts.gate_up_proj", "experts.down_proj")):
            base, which = name.rsplit(".", 1)
            deq = []
            for e, w in enumerate(t):
                parts = w.chunk(2) if which == "gate_up_proj" else [w]
                names = ["gate_proj", "up_proj"] if which == "gate_up_proj" else ["down_proj"]
                for part, proj in zip(parts, names):
                    scale = part.abs().max().reshape(1) / 448
                    key = f"{base}.{e}.{proj}.weight"
                    out[key], out[key + "_scale"] = _to_fp8(part, scale), scale
                    deq.append(out[key].float() * scale)
            state[local].copy_(torch.stack(deq).view(t.shape) if which == "down_proj"
                               else torch.stack([torch.cat(deq[i:i + 2]) for i in range(0, len(deq), 2)]))
        else:
            out[name] = t
    dst.mkdir()
    save_file(out, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"weights": {**weights, "strategy": "channel"}, "targets": ["re:.*self_attn.*"]},
                          "group_1": {"weights": {**weights, "strategy": "block", "block_structure": [32, 32]},
                                      "targets": ["re:.*mlp.*"]},
                          "group_2": {"weights": {**weights, "strategy": "tensor"}, "targets": ["re:.*experts.*"]}},
        "ignore": ["lm_head", "re:.*router.*"],
    }
    (dst / "config.json").write_text(json.dumps(config))
    return twin


def test_fp8_compressed_tensors_checkpoint(float_ckpt, tmp_path, float32_products):
    src, net = float_ckpt
    twin = _write_fp8(src, tmp_path / "fp8", net)
    model = dgemma.load(tmp_path / "fp8")
    q = model.net.layers[0].self_attn.q_proj.qtensor("weight")
    assert q.kind == "fp8" and q.codes.dtype == torch.float8_e4m3fn
    assert model.net.layers[0].experts.qtensor("gate_up_proj").shape == net.layers[0].experts.gate_up_proj.shape
    assert model.parameter_bytes() < Model(net).parameter_bytes() / 2
    from dgemma.quant import describe  # what `dgemma info` reports is what loading holds, without reading weights

    assert describe(tmp_path / "fp8", torch.float32)["resident_bytes"] == model.parameter_bytes()
    half = dgemma.load(tmp_path / "fp8", dtype="bfloat16").parameter_bytes()
    assert describe(tmp_path / "fp8", torch.bfloat16)["resident_bytes"] == half
    prompt, canvas = _inputs(model.config)
    torch.testing.assert_close(model.canvas_logits(prompt, canvas), Model(twin).canvas_logits(prompt, canvas),
                               rtol=1e-4, atol=1e-4)
    # FP8 -> int8 conversion goes through the same streaming path.
    quantize(tmp_path / "fp8", tmp_path / "int8", "int8", progress=False)
    again = dgemma.load(tmp_path / "int8")
    cos = torch.nn.functional.cosine_similarity(again.canvas_logits(prompt, canvas).flatten(),
                                                model.canvas_logits(prompt, canvas).flatten(), dim=0)
    assert cos > 0.999


def test_fp8_other_compressed_tensors_formats_are_refused(float_ckpt, tmp_path):
    src, net = float_ckpt
    _write_fp8(src, tmp_path / "w4", net)
    config = json.loads((tmp_path / "w4" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=4, type="int")
    (tmp_path / "w4" / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError, match="4-bit int weights; only 8-bit float"):
        dgemma.load(tmp_path / "w4")


def test_qtensor_rejects_inconsistent_parts():
    with pytest.raises(ValueError, match="int4 codes must be torch.uint8"):
        QTensor("int4", torch.zeros(2, 4, dtype=torch.int8), torch.ones(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="need an offset"):
        QTensor("int4", torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2, 1))
    assert dequantize(QTensor("int8", torch.ones(2, 4, dtype=torch.int8), torch.full((2, 2), 0.5))).eq(0.5).all()
