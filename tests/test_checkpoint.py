"""Checkpoint directories: both config forms, shards, name variants, round trip, memory, and clear errors."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgemma
from dgemma import checkpoint
from dgemma.config import GenerationSettings, preset
from dgemma.model.diffusion_gemma import DiffusionGemma


def _prompt_and_canvas():
    gen = torch.Generator().manual_seed(7)
    return torch.randint(3, 128, (1, 12), generator=gen), torch.randint(0, 128, (1, 16), generator=gen)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_official_config_form_reads_like_per_layer_config(tiny, tmp_path):
    """config.json with global_head_dim/num_global_key_value_heads instead of per_layer_config: same model."""
    path = _copy(tiny[0], tmp_path / "official")
    cfg = json.loads((path / "config.json").read_text())
    text = cfg["text_config"]
    assert text.pop("per_layer_config")  # the reference wrote the per-layer form
    text.update(global_head_dim=16, num_global_key_value_heads=1)
    (path / "config.json").write_text(json.dumps(cfg))
    a, b = dgemma.load(tiny[0]), dgemma.load(path)
    assert a.config == b.config
    prompt, canvas = _prompt_and_canvas()
    assert torch.equal(a.canvas_logits(prompt, canvas), b.canvas_logits(prompt, canvas))


def test_sharded_checkpoint_loads(tiny, tmp_path):
    ref = tiny[1]
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    prompt, canvas = _prompt_and_canvas()
    a, b = dgemma.load(tiny[0]), dgemma.load(tmp_path / "sharded")
    assert torch.equal(a.canvas_logits(prompt, canvas), b.canvas_logits(prompt, canvas))


def test_encoder_prefix_names_and_vision_notice(tiny, tmp_path, capsys):
    """Shared weights stored under model.encoder.language_model.* load the same; vision tensors are skipped."""
    path = _copy(tiny[0], tmp_path / "encoder-names")
    tensors = load_file(path / "model.safetensors")
    renamed = {}
    for name, t in tensors.items():
        if name.startswith("model.decoder.") and "self_conditioning" not in name and "layer_scalar" not in name:
            name = "model.encoder.language_model." + name[len("model.decoder."):]
        renamed[name] = t
    save_file(renamed, path / "model.safetensors")
    prompt, canvas = _prompt_and_canvas()
    a = dgemma.load(tiny[0])
    capsys.readouterr()
    b = dgemma.load(path)
    assert "skipped 16 vision tensors" in capsys.readouterr().err
    assert torch.equal(a.canvas_logits(prompt, canvas), b.canvas_logits(prompt, canvas))


def test_save_load_round_trip_and_transformers_reads_it(tmp_path):
    net = DiffusionGemma(preset("tiny")).init_weights(3)
    checkpoint.save(net, GenerationSettings(max_denoising_steps=9), tmp_path / "ours")
    model = dgemma.load(tmp_path / "ours")
    assert model.settings.max_denoising_steps == 9
    for name, t in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[name], t), name
    # transformers' loader accepts the directory (its vision tower is absent and gets initialised).
    from transformers import DiffusionGemmaForBlockDiffusion

    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "ours", experts_implementation="eager").eval()
    prompt = torch.randint(3, 500, (1, 40))
    canvas = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        expected = ref(input_ids=prompt, decoder_input_ids=canvas).logits
    got = model.canvas_logits(prompt, canvas)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_bf16_dtype_and_default_dtype(tiny):
    model = dgemma.load(tiny[0], dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in model.net.state_dict().values())
    assert dgemma.load(tiny[0]).dtype == torch.float32  # as stored
    prompt, canvas = _prompt_and_canvas()
    assert model.canvas_logits(prompt, canvas).dtype == torch.float32


@pytest.mark.parametrize("breakage, match", [
    ("truncate", "model.safetensors"),
    ("missing", "missing tensor model.decoder.layers.1.mlp.up_proj.weight"),
    ("model_type", "model_type is 'llama'"),
    ("no_config", "no config.json"),
    ("bad_json", "config.json: not valid JSON"),
    ("shape", "has shape"),
    ("no_weights", "no .safetensors weights"),
    ("window", "sliding_window must be at least 2, got 1"),
])
def test_broken_checkpoints_name_the_problem(tiny, tmp_path, breakage, match):
    path = _copy(tiny[0], tmp_path / breakage)
    weights = path / "model.safetensors"
    if breakage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif breakage == "missing":
        tensors = load_file(weights)
        del tensors["model.decoder.layers.1.mlp.up_proj.weight"]
        save_file(tensors, weights)
    elif breakage == "model_type":
        cfg = json.loads((path / "config.json").read_text())
        cfg["model_type"] = "llama"
        (path / "config.json").write_text(json.dumps(cfg))
    elif breakage == "no_config":
        (path / "config.json").unlink()
    elif breakage == "bad_json":
        (path / "config.json").write_text("{not json")
    elif breakage == "shape":
        cfg = json.loads((path / "config.json").read_text())
        cfg["text_config"]["intermediate_size"] = 50
        (path / "config.json").write_text(json.dumps(cfg))
    elif breakage == "no_weights":
        weights.unlink()
    elif breakage == "window":
        cfg = json.loads((path / "config.json").read_text())
        cfg["text_config"]["sliding_window"] = 1
        (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match=match):
        dgemma.load(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint directory"):
        dgemma.load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="is a file"):
        dgemma.load(tmp_path / "file")


def test_official_shape_on_meta_device():
    """The released config, without allocating weights: ~25.2B total, ~3.8B active parameters."""
    cfg = preset("26b-a4b")
    with torch.device("meta"):
        net = DiffusionGemma(cfg)
    counted = sum(p.numel() for p in net.parameters())
    total, active = cfg.parameter_counts()
    assert counted == total
    assert 25.1e9 < total < 25.3e9, total
    assert 3.75e9 < active < 3.9e9, active
    print(f"\nofficial shape: {total / 1e9:.3f}B total, {active / 1e9:.3f}B active")


def test_bf16_load_peak_memory(tmp_path):
    """Loading a ~100M-parameter bf16 checkpoint (and touching every weight) raises peak RSS by < 1.5x its bytes."""
    net = DiffusionGemma(preset("small", num_hidden_layers=6)).init_weights(0).to(torch.bfloat16)
    n_params = sum(p.numel() for p in net.parameters())
    assert 90e6 < n_params < 130e6
    checkpoint.save(net, GenerationSettings(), tmp_path / "m")
    del net
    script = textwrap.dedent(f"""
        import torch, dgemma, dgemma.model.diffusion_gemma
        def status(key):  # bytes; VmHWM is this process's own peak (ru_maxrss would include the forking parent)
            line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
            return int(line.split()[1]) * 1024
        # Warm up what is paid once per process (thread pools, meta-device machinery) before the baseline.
        torch.ones(64, dtype=torch.bfloat16).sum()
        with torch.device("meta"):
            dgemma.model.diffusion_gemma.DiffusionGemma(dgemma.config.preset("tiny"))
        base = status("VmRSS")
        model = dgemma.load({str(tmp_path / "m")!r}, dtype="bfloat16")
        for t in model.net.state_dict().values():
            t.sum()  # touch every weight, so lazily mapped file pages count too
        print(status("VmHWM") - base, model.parameter_bytes())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    grown, weight_bytes = map(int, out.split())
    print(f"\nbf16 load: weights {weight_bytes / 1e6:.1f} MB, peak RSS growth {grown / 1e6:.1f} MB "
          f"({grown / weight_bytes:.2f}x)")
    assert grown < 1.5 * weight_bytes


def test_write_atomic_replaces_a_file_whole_or_not_at_all(tmp_path):
    from dgemma.checkpoint import write_atomic

    target = tmp_path / "result.json"
    target.write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, fails)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    write_atomic(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
