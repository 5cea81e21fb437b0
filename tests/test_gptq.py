"""Calibrated rounding (GPTQ): the rounding itself, calibration on a model, and `dgemma quantize --calibrate`."""

import copy
import json

import pytest
import torch

import dgemma
from dgemma.api import Model
from dgemma.cli import main
from dgemma.config import preset
from dgemma.quant import dequantize, quantize_model
from dgemma.quant.formats import quantize
from dgemma.quant.gptq import calibrate, calibration_windows, gptq
from test_quant import _realistic

CASES = [("int8", None, (2, 24, 64)), ("int4", 32, (3, 24, 64)), ("int4", 64, (24, 128))]


def _correlated(k: int, n: int = 400, seed: int = 0) -> torch.Tensor:
    """Inputs [n, k] whose features co-vary strongly, as a layer's inputs do."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) @ torch.randn(k, k, generator=gen) * 0.3 + torch.randn(n, k, generator=gen)


def _output_error(q, w, x) -> float:
    return ((x @ (dequantize(q) - w).transpose(-1, -2)) ** 2).mean().item()


@pytest.mark.parametrize("kind, group, shape", CASES)
def test_an_identity_hessian_gives_round_to_nearest(kind, group, shape):
    """With uncorrelated inputs there is nothing to move errors onto: GPTQ is `formats.quantize` bit for bit."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    k = shape[-1]
    eye = torch.eye(k).expand(*shape[:-2], k, k) * 3.0
    ours, nearest = gptq(w, eye, kind, group), quantize(w, kind, group)
    assert all(torch.equal(a, b) for a, b in zip(ours.tensors(), nearest.tensors()))


@pytest.mark.parametrize("kind, group, shape", CASES)
def test_gptq_moves_the_output_less_than_rounding_to_nearest(kind, group, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    x = _correlated(shape[-1])
    h = (x.T @ x).expand(*shape[:-2], shape[-1], shape[-1])
    ours, nearest = gptq(w, h, kind, group), quantize(w, kind, group)
    assert ours.shape == nearest.shape and ours.scale.dtype == nearest.scale.dtype
    assert _output_error(ours, w, x) < 0.75 * _output_error(nearest, w, x)


def test_unseen_inputs_and_unrouted_experts_are_rounded_to_nearest():
    w = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    x = _correlated(64)
    x[:, 5] = 0.0  # input 5 never seen
    h = torch.stack([x.T @ x, torch.zeros(64, 64)])  # expert 1 got no calibration token
    ours, nearest = gptq(w, h, "int4", 32), quantize(w, "int4", 32)
    for a, b in zip(ours.tensors(), nearest.tensors()):
        assert torch.equal(a[1], b[1])
    assert torch.equal(dequantize(ours)[0, :, 5], dequantize(nearest)[0, :, 5])  # its group's first error stays put
    with pytest.raises(ValueError, match="hessian shape"):
        gptq(w, h[0], "int4", 32)


def test_calibration_windows_are_consecutive_and_need_enough_text():
    docs = [list(range(0, 7)), list(range(100, 110)), list(range(200, 230))]
    windows = calibration_windows(iter(docs), 3, 5)
    assert windows.tolist() == [[0, 1, 2, 3, 4], [5, 6, 100, 101, 102], [103, 104, 105, 106, 107]]
    with pytest.raises(ValueError, match="holds 47 tokens; 10 windows of 5 need 50"):
        calibration_windows(iter(docs), 10, 5)


def test_calibrated_model_is_closer_to_float_than_round_to_nearest():
    """Every quantized weight but the embedding comes calibrated, in the format asked; on text like the calibration
    text the calibrated model's logits are nearer the float model's."""
    cfg = preset("tiny")
    net = _realistic(cfg, seed=4)
    gen = torch.Generator().manual_seed(5)
    windows = torch.randint(3, cfg.vocab_size, (24, 2 * cfg.canvas_length), generator=gen)
    weights = calibrate(net, windows, "int4", 32, dense="int8")
    linears = {n for n, _ in net.named_parameters() if n.endswith("proj.weight") and "router" not in n}
    experts = {n for n, _ in net.named_parameters() if ".experts." in n}
    assert set(weights) == linears | experts
    assert {weights[n].kind for n in experts} == {"int4"} and {weights[n].kind for n in linears} == {"int8"}

    prompt, canvas = windows[:8, :cfg.canvas_length], windows[:8, cfg.canvas_length:]
    ref = Model(net).canvas_logits(prompt, canvas)
    errors = {}
    for name, given in (("nearest", None), ("calibrated", weights)):
        q = quantize_model(copy.deepcopy(net), "int4", 32, dense="int8", calibrated=given)
        errors[name] = (Model(q).canvas_logits(prompt, canvas) - ref).square().mean().item()
    assert errors["calibrated"] < 0.95 * errors["nearest"]
    with pytest.raises(ValueError, match="is int4, but this format makes it int8"):
        quantize_model(copy.deepcopy(net), "int8", calibrated=weights)


def test_cli_quantize_calibrate(tmp_path, capsys):
    bundled = dgemma.load().path
    for i in range(3):
        (tmp_path / "text" / f"m{i}").mkdir(parents=True)
        (tmp_path / "text" / f"m{i}" / "code.py").write_text(
            "".join(f"def f{i}_{j}(x, y):\n    return x * {j} + y - {i}\n\n" for j in range(40)))
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(bundled), "--to", "int4", "--group-size", "32", "--dense", "int8",
                 "--calibrate", str(tmp_path / "text" / "m0" / "code.py"), str(tmp_path / "text" / "m[12]" / "*.py"),
                 "--calibration-windows", "6",
                 "--out", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "config.json").read_text())["quantization_config"]
    assert meta["format"] == "int4" and meta["dense"] == "int8" and meta["group_size"] == 32
    model = dgemma.load(out)
    nearest = quantize_model(copy.deepcopy(dgemma.load().net), "int4", 32, dense="int8")
    calibrated, plain = model.net.layers[0].experts.qtensor("down_proj"), nearest.layers[0].experts.qtensor("down_proj")
    assert calibrated.shape == plain.shape and not torch.equal(calibrated.codes, plain.codes)
    assert torch.equal(model.net.embed_tokens.qtensor("weight").codes, nearest.embed_tokens.qtensor("weight").codes)
    capsys.readouterr()

    args = ["quantize", "--model", str(bundled), "--to", "int8", "--out", str(tmp_path / "x"), "--no-progress"]
    assert main(args + ["--calibrate", str(tmp_path / "text" / "**" / "*.py"), str(tmp_path / "none" / "*.txt")]) == 2
    assert f"--calibrate {str(tmp_path / 'none' / '*.txt')!r} matches no files" in capsys.readouterr().err
    assert main(args + ["--calibrate", str(tmp_path / "text" / "m0" / "*.py"), "--calibration-windows", "500"]) == 2
    assert "give more text or fewer windows" in capsys.readouterr().err
    assert main(args[:2] + [str(out)] + args[3:] + ["--calibrate", str(tmp_path / "text" / "**" / "*.py")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
