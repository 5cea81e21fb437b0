"""`dgemma bench` on the tiny shape: result structure, table, JSON and PNG, comparisons, fixed steps. No timings."""

import json

import pytest

from dgemma.bench import BenchOptions, format_table, run_bench
from dgemma.cli import main


@pytest.fixture(scope="module")
def result():
    opts = BenchOptions(shape="tiny", batches=(1, 2), prompt_len=8, steps=2, warmup=0, compare=("reference", "ar"))
    return run_bench(opts)


def test_every_implementation_and_batch_is_measured(result):
    assert [(r["impl"], r["batch"]) for r in result["runs"]] == [
        (impl, b) for b in (1, 2) for impl in ("ours", "reference", "ar")]
    for r in result["runs"]:
        assert r["new_tokens"] == r["batch"] * 32  # one tiny canvas per row
        for key in ("decode_tokens_per_s", "end_to_end_tokens_per_s", "ms_per_step", "tokens_per_forward",
                    "seconds", "decode_seconds"):
            assert r[key] > 0, (r["impl"], key)
        assert r["peak_memory_bytes"] >= 0 and r["roofline_fraction"] is None  # no bandwidth probe on the CPU
    assert {(x["batch"], x["against"]) for x in result["ratios"]} == {
        (b, other) for b in (1, 2) for other in ("reference", "ar")}
    assert all(x["decode"] > 0 and x["end_to_end"] > 0 for x in result["ratios"])
    assert result["reference_experts"] and 0 < result["step_weight_bytes"]["1"] <= result["weight_bytes"]


@pytest.mark.parametrize("new_tokens", [1, 2, 3])
def test_autoregressive_runs_of_a_few_tokens_are_timed(new_tokens):
    """Below three tokens there is no gap between token steps to time: the call over its passes stands in."""
    opts = BenchOptions(shape="tiny", batches=(1,), prompt_len=4, steps=2, warmup=0, new_tokens=new_tokens,
                        compare=("ar",))
    ar = [r for r in run_bench(opts)["runs"] if r["impl"] == "ar"]
    assert len(ar) == 1 and ar[0]["decode_tokens_per_s"] > 0 and ar[0]["ms_per_step"] > 0


def test_fixed_step_mode_runs_exactly_the_fixed_steps(result):
    for r in result["runs"]:
        if r["impl"] == "ar":
            assert r["steps_per_canvas"] == [] and r["tokens_per_forward"] == pytest.approx(1, rel=0.1)
        else:
            assert result["max_denoising_steps"] == 2 and r["steps_per_canvas"] == [2]
            assert all(run["steps_per_canvas"] == [2] and run["row_steps"] == [[2]] * r["batch"]
                       for run in r["repeats"])


def test_adaptive_mode_caps_the_steps():
    result = run_bench(BenchOptions(shape="tiny", batches=(2,), prompt_len=4, steps=3, adaptive=True, warmup=0))
    assert result["mode"] == "adaptive" and result["max_denoising_steps"] == 3
    assert 2 <= result["runs"][0]["steps_per_canvas"][0] <= 3


def test_table_names_every_run(result):
    table = format_table(result)
    assert "decode tok/s" in table and "ours / reference" in table and "ours / ar" in table
    rows = [line.split() for line in table.splitlines()]
    assert [row[:2] for row in rows if row[0] in ("ours", "reference", "ar")] == [
        [impl, b] for b in ("1", "2") for impl in ("ours", "reference", "ar")]


def test_command_writes_json_and_png(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--shape", "tiny", "--batch", "1", "--steps", "3", "--new-tokens", "40", "--prompt-len",
                 "5", "--warmup", "0", "--json-out", str(out), "--png", str(png)]) == 0
    assert "ms/step" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["runs"][0]["steps_per_canvas"] == [3, 3]  # 40 tokens take two canvases of 32
    assert data["runs"][0]["new_tokens"] == 40
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "bench-results.json").exists()


def test_compare_takes_both_spellings():
    from dgemma.cli import _parser

    for argv in (["--compare", "reference", "ar"], ["--compare", "reference", "--compare", "ar"]):
        assert _parser().parse_args(["bench", *argv]).compare == ["reference", "ar"]


def test_refusals(capsys):
    assert main(["bench", "--shape", "26b-a4b"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["bench", "--shape", "tiny", "--steps", "1"]) == 2
    assert "steps must be >= 2" in capsys.readouterr().err


def test_meta_device_reports_weight_bytes_only(capsys):
    assert main(["bench", "--shape", "26b-a4b", "--device", "meta", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "read per denoising step" in out and "impl" not in out


def test_quantized_formats_run_from_the_same_weights():
    opts = BenchOptions(shape="tiny", batches=(1,), prompt_len=4, steps=2, warmup=0, quant=("int8", "int4"))
    result = run_bench(opts)
    runs = {r["impl"]: r for r in result["runs"]}
    assert list(runs) == ["ours", "int8", "int4"]
    assert all(r["steps_per_canvas"] == [2] and r["decode_tokens_per_s"] > 0 for r in runs.values())
    # The quantized runs read fewer weight bytes per step than float32, int4 fewer than int8.
    reads = [runs[k]["step_weight_bytes"] for k in ("ours", "int8", "int4")]
    assert reads[0] > reads[1] > reads[2] > 0
    assert {(x["impl"], x["against"]) for x in result["ratios"]} == {("int8", "ours"), ("int4", "ours")}
    assert "int4 / ours" in format_table(result)


def test_interleaved_runs_measure_every_implementation_repeat_times():
    opts = BenchOptions(shape="tiny", batches=(1, 2), prompt_len=4, steps=2, warmup=1, repeat=2, compare=("ar",),
                        quant=("int8", "int4"), interleave=True)
    log: list[str] = []
    result = run_bench(opts, log=log.append)
    runs = {(r["impl"], r["batch"]): r for r in result["runs"]}
    assert list(runs) == [(impl, b) for b in (1, 2) for impl in ("ours", "ar")] + \
        [(kind, b) for kind in ("int8", "int4") for b in (1, 2)]
    assert all(len(r["repeats"]) == 2 for r in runs.values())
    assert all(r["steps_per_canvas"] == [2] for (impl, _), r in runs.items() if impl != "ar")
    reads = [runs[impl, 1]["step_weight_bytes"] for impl in ("ours", "int8", "int4")]
    assert reads[0] > reads[1] > reads[2] > 0
    # One measured run of each implementation per round, rounds in turn: the logs of round 1 precede round 2's.
    measured = [m.split(":")[0] for m in log if ": run " in m]
    assert measured == 2 * [f"{impl} batch {b}" for impl, b in runs]
    assert log.index("interleaved round 2/2") == len(log) - 1 - len(runs) - len(runs)


def test_quantized_copy_leaves_the_float_model_intact():
    import torch

    from dgemma.api import Model
    from dgemma.bench import quantized, random_network
    from dgemma.config import GenerationSettings, preset
    from dgemma.quant.modules import is_quantized

    net = random_network(preset("tiny"), torch.device("cpu"), torch.float32, 0)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, net.config.vocab_size, (1, 4), generator=gen).tolist()
    canvas = torch.randint(3, net.config.vocab_size, (1, net.config.canvas_length), generator=gen).tolist()
    before = Model(net, GenerationSettings()).canvas_logits(prompt, canvas)
    q = quantized(net, "int8", None, in_place=False)
    assert is_quantized(q) and not is_quantized(net)
    assert q.layers[0].router.proj.weight is net.layers[0].router.proj.weight  # float tensors are shared
    assert torch.equal(Model(net, GenerationSettings()).canvas_logits(prompt, canvas), before)
    got = Model(q, GenerationSettings()).canvas_logits(prompt, canvas)
    # Loose: random routers sit on near-ties that int8 can flip (tests/test_quant.py checks accuracy properly).
    assert 0.98 < torch.nn.functional.cosine_similarity(before.flatten(), got.flatten(), dim=0) < 1


def test_cpu_26b_script_builds_random_quantized_weights_and_prints_its_table(monkeypatch, capsys):
    """bench/cpu_26b.py on the tiny shape: every quantizable weight random int4 (experts) or int8 (the rest), built
    without a float copy, then one canvas generated; the table names memory and speed."""
    import runpy
    import sys
    from pathlib import Path

    import torch

    from dgemma.config import preset
    from dgemma.quant import dequantize
    from dgemma.quant.modules import build

    script = Path(__file__).resolve().parents[1] / "bench" / "cpu_26b.py"
    module = runpy.run_path(str(script))
    cfg = preset("tiny")
    net = build(cfg, module["entries"](cfg, 32, 0), torch.float32, torch.device("cpu"), "tiny")
    experts, attention = net.layers[0].experts, net.layers[0].self_attn.q_proj
    assert (experts.qtensor("gate_up_proj").kind, experts.qtensor("gate_up_proj").group_size) == ("int4", 32)
    for q in (attention.qtensor("weight"), net.embed_tokens.qtensor("weight")):  # as `dgemma quantize` groups them
        assert (q.kind, q.group_size) == ("int8", 32)
    assert 0.015 < dequantize(experts.qtensor("down_proj")).std().item() < 0.025  # spread like the N(0, 0.02) init

    monkeypatch.setattr(sys, "argv", ["cpu_26b.py", "--shape", "tiny", "--steps", "3"])
    module["main"]()
    header, _, row = capsys.readouterr().out.strip().splitlines()
    assert "peak RSS (GB)" in header and "s / step" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "tiny" and float(cells[6]) > 0 and float(cells[5]) >= float(cells[4]) > 0
