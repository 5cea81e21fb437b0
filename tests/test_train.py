"""Training: the loss falls, --resume is exact, saves are atomic, outputs load everywhere, bad inputs are named."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.train import trainer as trainer_mod
from dgemma.train.data import ChatData, Shape, TextData
from dgemma.train.objective import ObjectiveOptions, corrupt, losses
from dgemma.train.trainer import Trainer, read_config
from dgemma.tokenizer import Tokenizer

CODE = '''def add(a, b):
    """Return the sum."""
    return a + b


class Box:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value
'''


def write_config(tmp_path: Path, **sections) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for i in range(3):
        (data / f"m{i}.py").write_text(CODE.replace("add", f"add{i}") * 4)
    base = {
        "model": {"preset": "tiny", "canvas_length": 8,
                  "overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "layer_types": ["sliding_attention", "full_attention"], "num_experts": 4,
                                "moe_intermediate_size": 16, "sliding_window": 16}},
        "data": {"train": [str(data / "m[01].py")], "heldout": [str(data / "m2.py")]},
        "train": {"out": str(tmp_path / "run"), "steps": 6, "batch_size": 4, "max_prefix": 12, "lr": 3e-3,
                  "warmup": 2, "eval_every": 3, "eval_batches": 1, "save_every": 3, "seed": 1},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
        base[name] = {k: v for k, v in base[name].items() if v is not None}  # None removes a key
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        for k, v in values.items():
            if not isinstance(v, dict):
                lines.append(f"{k} = {json.dumps(v)}")
        for k, v in nested.items():
            lines.append(f"[{name}.{k}]")
            lines.extend(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(config: Path, *overrides: str, resume: bool = False) -> Trainer:
    trainer = Trainer(read_config(config, list(overrides)), resume=resume, log=lambda m: None)
    trainer.run()
    return trainer


def test_loss_falls_and_outputs_load(tmp_path):
    cfg = write_config(tmp_path)
    t = run(cfg, "train.steps=40", "train.save_every=40", "train.eval_every=20")
    losses = t.history["loss"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    out = tmp_path / "run" / (tmp_path / "run" / "latest").read_text()
    model = dgemma.load(out)
    assert model.tokenizer is not None
    r = model.complete("def add", max_new_tokens=8, max_denoising_steps=4, seed=0)
    assert len(r.result.token_ids[0]) <= 8
    # transformers reads the same directory and computes the same logits.
    from transformers import DiffusionGemmaForBlockDiffusion

    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(out, experts_implementation="eager").eval()
    prompt, canvas = torch.randint(3, 200, (1, 10)), torch.randint(0, 200, (1, 8))
    with torch.no_grad():
        expected = ref(input_ids=prompt, decoder_input_ids=canvas).logits
    assert (model.canvas_logits(prompt, canvas) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    straight = run(write_config(tmp_path / "a" if (tmp_path / "a").mkdir() is None else None))
    cfg = write_config(tmp_path / "b" if (tmp_path / "b").mkdir() is None else None)
    original = Trainer.step

    def crash_at_4(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "step", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(Trainer, "step", original)
    resumed = run(cfg, resume=True)
    assert resumed.history["loss"] == straight.history["loss"]
    assert resumed.history["eval_loss"] == straight.history["eval_loss"]


def test_bf16_autocast_trains_in_bfloat16(tmp_path):
    cfg = write_config(tmp_path, train={"steps": 8, "save_every": 8, "eval_every": 8})
    full = run(cfg, f"train.out={json.dumps(str(tmp_path / 'f32'))}").history["loss"]
    half = run(cfg, f"train.out={json.dumps(str(tmp_path / 'bf16'))}", "train.bf16=true").history["loss"]
    assert half != full  # the matmuls really ran in bfloat16 ...
    assert half == pytest.approx(full, rel=0.05)  # ... and train the same model
    assert sum(half[-3:]) < sum(half[:3])
    assert dgemma.load(tmp_path / "bf16" / "step-000008").net.dtype == torch.float32  # weights stay float32


def test_resume_when_some_parameters_never_had_a_gradient(tmp_path):
    # Without self-conditioning its MLP gets no gradient, so AdamW keeps no state for it: resuming must cope.
    cfg = write_config(tmp_path, train={"steps": 4, "save_every": 2, "eval_every": 2},
                       objective={"self_conditioning": 0.0})
    straight = run(cfg)
    shutil.rmtree(tmp_path / "run" / "step-000004")
    (tmp_path / "run" / "latest").write_text("step-000002")
    assert run(cfg, resume=True).history["loss"] == straight.history["loss"]


def test_resume_names_the_settings_changed_since_the_checkpoint(tmp_path):
    cfg = write_config(tmp_path, train={"steps": 2, "save_every": 2, "eval_every": 2})
    run(cfg)
    lines = []
    trainer = Trainer(read_config(cfg, ["train.steps=3", "objective.span=0.5"]), resume=True, log=lines.append)
    assert trainer.start_step == 2
    changed = [line for line in lines if line.startswith("resuming")]
    assert changed == ["resuming step-000002 with settings changed since it was saved: "
                       "train.steps: 2 -> 3; objective.span: 0.0 -> 0.5"]
    lines.clear()
    Trainer(read_config(cfg), resume=True, log=lines.append)
    assert not any(line.startswith("resuming") for line in lines)


def test_a_fresh_run_refuses_an_out_directory_holding_checkpoints(tmp_path):
    """Starting over into a used train.out would prune the old run's checkpoints by name: refused, nothing touched."""
    cfg = write_config(tmp_path, train={"steps": 2, "save_every": 2, "eval_every": 2})
    run(cfg)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ValueError, match="run/? already holds checkpoints of a run: pass --resume"):
        Trainer(read_config(cfg))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = write_config(tmp_path)
    calls = {"n": 0}
    real = trainer_mod.save_file

    def dies_on_second_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process is killed while writing the step-6 checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "save_file", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    run_dir = tmp_path / "run"
    assert (run_dir / "latest").read_text() == "step-000003"
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step-")) == ["step-000003"]
    dgemma.load(run_dir / "step-000003")
    monkeypatch.setattr(trainer_mod, "save_file", real)
    assert run(cfg, resume=True).start_step == 3


def _torchrun(cfg: Path, out: Path, port: int, *sets: str) -> dict:
    """Train `cfg` in 2 processes (gloo) into `out`; returns the history of its last checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "dgemma.train", str(cfg), "--set", f"train.out={json.dumps(str(out))}", *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / (out / "latest").read_text() / "trainer_state.json").read_text())["history"]


def test_two_process_torchrun_matches_one_process(tmp_path):
    cfg = write_config(tmp_path, train={"steps": 4, "save_every": 4, "eval_every": 4})
    single = run(cfg, f"train.out={json.dumps(str(tmp_path / 'one'))}")
    two = _torchrun(cfg, tmp_path / "two", 29517)
    assert two["loss"] == pytest.approx(single.history["loss"], rel=1e-6)


def test_fsdp_matches_one_process_and_resumes_exactly(tmp_path):
    cfg = write_config(tmp_path, train={"steps": 4, "save_every": 2, "eval_every": 2, "parallel": "fsdp",
                                        "grad_accum": 2})  # gradients reduced once per step, after both
    single = run(cfg, f"train.out={json.dumps(str(tmp_path / 'one'))}")  # one process: no sharding
    sharded = _torchrun(cfg, tmp_path / "two", 29518)
    # Later steps drift by ~1e-4 in both ddp and fsdp: Adam magnifies the cross-process summation order in
    # near-zero gradients (2-process ddp and fsdp agree with each other to 1e-8 there).
    # Every step agrees: a module no process used this step (self-conditioning, drawn per row) gets no gradient in
    # any process, so AdamW leaves it alone everywhere.
    assert sharded["loss"] == pytest.approx(single.history["loss"], rel=1e-6)
    # Resume the sharded run from its step-2 checkpoint: optimizer state is gathered on save and re-sharded.
    shutil.rmtree(tmp_path / "two" / "step-000004")
    (tmp_path / "two" / "latest").write_text("step-000002")
    resumed = _torchrun(cfg, tmp_path / "two", 29519, "--resume")
    assert resumed["loss"] == sharded["loss"] and resumed["eval_loss"] == sharded["eval_loss"]
    dgemma.load(tmp_path / "two" / "step-000004")  # a standard, unsharded checkpoint


def test_chat_data_supervises_only_the_reply(tmp_path):
    tok = Tokenizer.byte_level()
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello there"}]}) + "\n")
    data = ChatData([f], tok)
    batch = data.batch(Shape(8, 2, 0, 64), 0, 0, 0, range(2))
    prompt, reply = data.examples[0]
    prefix = batch.ids.shape[1] - 16
    assert batch.ids[0, prefix:prefix + len(reply)].tolist() == reply
    assert not batch.supervise[0, :prefix].any()
    assert batch.supervise[0, prefix:prefix + 16].all()  # the reply (11 + EOS) and the pad of its 2nd block



def test_chat_data_trains_every_block_of_a_long_reply_and_keeps_bos(tmp_path):
    tok = Tokenizer.byte_level()
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "q" * 40},
                                          {"role": "assistant", "content": "abcdefghij" * 3}]}) + "\n")
    data = ChatData([f], tok)
    prompt, reply = data.examples[0]  # 31 reply tokens with EOS: 4 blocks of 8
    shape = Shape(8, 1, 0, 12)
    starts = set()
    for step in range(40):
        batch = data.batch(shape, 0, step, 0, range(1))
        ids, sup = batch.ids[0].tolist(), batch.supervise[0]
        assert len(ids) == 12 + 8 and ids[0] == prompt[0] and sup[12:].all() and not sup[:12].any()
        block = next(b for b in range(4) if reply[8 * b:8 * b + 8] == ids[12:12 + len(reply[8 * b:8 * b + 8])])
        context = prompt + reply[:8 * block]
        assert ids[1:12] == context[-11:]  # the context's end, after its first token
        starts.add(block)
    assert starts == {0, 1, 2, 3}  # the block holding EOS is trained too
    zero = data.batch(Shape(8, 2, 0, 0), 0, 0, 0, range(1))  # no room for context at all
    assert zero.ids.shape == (1, 16) and zero.valid[0].all()


@pytest.mark.parametrize("change, match", [
    ({"data": {"train": ["/nowhere/*.py"]}}, "matches no files"),
    ({"train": {"stepz": 3}}, "unknown config key train.stepz"),
    ({"modle": {"preset": "tiny"}}, "unknown config section"),
    ({"train": {"max_prefix": 5000}}, "needs 5008 positions"),
    ({"train": {"parallel": "zero3"}}, "train.parallel must be 'ddp' or 'fsdp'"),
    ({"objective": {"span": 1.5}}, "objective.span is a probability"),
    ({"objective": {"lines": 0.5}}, "objective.lines chooses among span rows"),
    ({"data": {"line_aligned": 2.0}}, "data.line_aligned is a probability"),
    ({"data": {"kind": "chat", "line_aligned": 0.5}}, "data.line_aligned applies to text data"),
])
def test_bad_configs_name_the_problem(tmp_path, change, match):
    cfg = write_config(tmp_path, **change)
    with pytest.raises(ValueError, match=match):
        run(cfg)


def test_a_held_out_text_too_short_is_refused_before_training(tmp_path):
    (tmp_path / "short.py").write_text("x = 1\n")
    cfg = write_config(tmp_path, data={"heldout": [str(tmp_path / "short.py")]})
    with pytest.raises(ValueError, match="the held-out text has .* tokens, fewer than one sequence of 20"):
        Trainer(read_config(cfg), log=lambda m: None)


def test_old_checkpoints_are_pruned_by_step_number(tmp_path):
    for step in (998_000, 999_000, 1_000_000):
        (tmp_path / f"step-{step:06d}").mkdir()
    trainer_mod.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1000000", "step-999000"]


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys):
    f = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    f.write_text(good + "\n{broken\n" + good + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:2: malformed JSON"):
        ChatData([f], Tokenizer.byte_level())
    data = ChatData([f], Tokenizer.byte_level(), skip_bad_lines=True)
    assert len(data) == 2 and "chat.jsonl:2" in capsys.readouterr().err


def test_cli_entry_and_override_parsing(tmp_path, capsys):
    cfg = write_config(tmp_path, train={"steps": 2, "save_every": 2, "eval_every": 2})
    from dgemma.cli import main

    assert main(["train", str(cfg), "--set", "train.lr=0.001"]) == 0
    assert (tmp_path / "run" / "step-000002" / "model.safetensors").is_file()
    assert main(["train", str(cfg), "--set", "train.nope=1"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0 and "--resume" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "run")


def test_lora_trains_only_adapters_and_merges_to_the_same_logits(tmp_path):
    from dgemma import checkpoint
    from dgemma.train import lora

    run(write_config(tmp_path, train={"steps": 2, "save_every": 2, "eval_every": 2}))
    base_dir = tmp_path / "run" / "step-000002"
    cfg = write_config(tmp_path, model={"preset": None, "checkpoint": str(base_dir)},
                       train={"out": str(tmp_path / "lora"), "steps": 3, "save_every": 3, "eval_every": 3,
                              "lr": 0.05},
                       lora={"rank": 4, "alpha": 8.0})
    run(cfg)
    out = tmp_path / "lora" / "step-000003"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    base, merged = dgemma.load(base_dir), dgemma.load(out)
    changed = {k for k, v in merged.net.state_dict().items() if not torch.equal(v, base.net.state_dict()[k])}
    assert changed and all(k.split(".")[2] in ("self_attn", "mlp") and k.split(".")[3] in
                           lora.ATTENTION + lora.DENSE_MLP for k in changed), sorted(changed)
    # Base + saved adapters (unmerged) computes what the merged checkpoint computes.
    cfg_model, _ = checkpoint.read_config(base_dir)
    adapted = checkpoint.load_weights(base_dir, cfg_model, torch.float32, torch.device("cpu"))
    lora.load_adapters(adapted, out)
    prompt, canvas = torch.randint(3, 200, (1, 10)), torch.randint(0, 200, (1, 8))
    unmerged = dgemma.Model(adapted).canvas_logits(prompt, canvas)
    assert torch.allclose(unmerged, merged.canvas_logits(prompt, canvas), atol=1e-4)
    assert not torch.allclose(unmerged, base.canvas_logits(prompt, canvas), atol=1e-4)
    # The adapters were trained at alpha / rank = 2: resuming them at another scale is refused.
    with pytest.raises(ValueError, match="a LoRA run resumes with the settings it started with"):
        run(cfg, "lora.alpha=64.0", "train.steps=4", resume=True)


def test_several_blocks_per_sequence_and_balance_loss(tmp_path):
    """Two supervised canvases per sequence (the second reads the first through the encoder) and the MoE
    load-balancing term: the run trains and its losses are finite."""
    cfg = write_config(tmp_path, train={"steps": 2, "save_every": 2, "eval_every": 2, "blocks": 2},
                       objective={"balance_weight": 0.01, "reweight": True})
    t = run(cfg)
    assert all(torch.isfinite(torch.tensor(v)) for v in t.history["loss"])
    assert t.shape.blocks == 2


def _streams(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_span_corruption_noises_one_run_and_uniform_noise_is_unchanged():
    """span=1: every row has exactly one contiguous noised run, of every length and start over many rows, and the
    returned rate is its length / C. span=0 draws exactly the per-token uniform noise it drew before the option."""
    rows, c, vocab = 400, 16, 50
    block = torch.full((rows, c), -1)  # outside the vocabulary: every noised position shows
    t = torch.rand(rows, generator=torch.Generator().manual_seed(9))
    noisy, rate = corrupt(block, t, vocab, _streams(rows), span=1.0)
    runs = set()
    for row, r in zip(noisy, rate.tolist()):
        where = (row != -1).nonzero().flatten().tolist()
        assert where and where == list(range(where[0], where[-1] + 1))
        assert r == len(where) / c
        runs.add((where[0], len(where)))
    assert {n for _, n in runs} == set(range(1, c + 1)) and {s for s, _ in runs} == set(range(c))
    noisy, rate = corrupt(block, t, vocab, _streams(rows), span=0.0)
    flip, ids = [], []
    for g in _streams(rows):
        flip.append(torch.rand(c, generator=g))
        ids.append(torch.randint(0, vocab, (c,), generator=g))
    expected = torch.where(torch.stack(flip) < t[:, None], torch.stack(ids), block)
    assert torch.equal(noisy, expected) and torch.equal(rate, t)
    mixed, _ = corrupt(block, t, vocab, _streams(rows), span=0.5)
    assert torch.equal(mixed, corrupt(block, t, vocab, _streams(rows), span=0.5)[0])
    assert not torch.equal(mixed, noisy)


def test_line_spans_noise_one_whole_line():
    """lines=1: a span row whose block holds line starts has exactly the run from one of them (each chosen over the
    rows) to the next one or the block's end noised; a block without one falls back to a random span."""
    c, vocab, rows = 12, 50, 60
    line_start = torch.zeros(vocab, dtype=torch.bool)
    line_start[[7, 9]] = True
    lined = torch.tensor([1, 7, 2, 3, 9, 4, 5, 6, 7, 8, 10, 11])  # lines begin at positions 1, 4 and 8
    block = torch.stack([lined] * rows + [torch.arange(20, 20 + c)] * rows)
    t = torch.rand(2 * rows, generator=torch.Generator().manual_seed(3))
    noisy, rate = corrupt(block, t, vocab, _streams(2 * rows), span=1.0, lines=1.0, line_start=line_start)
    starts = set()
    for i, g in enumerate(_streams(2 * rows)):
        torch.rand(2, generator=g)  # the span and line coins
        if i < rows:
            k = int(torch.randint(0, 3, (1,), generator=g))
            start, end = [(1, 4), (4, 8), (8, 12)][k]
            starts.add(start)
        else:
            length = int(torch.randint(1, c + 1, (1,), generator=g))
            start = int(torch.randint(0, c - length + 1, (1,), generator=g))
            end = start + length
        inside = (torch.arange(c) >= start) & (torch.arange(c) < end)
        noise = torch.randint(0, vocab, (c,), generator=g)
        assert torch.equal(noisy[i], torch.where(inside, noise, block[i])) and rate[i] == (end - start) / c
    assert starts == {1, 4, 8}
    with pytest.raises(ValueError, match="objective.lines needs"):
        losses(None, None, ObjectiveOptions(span=0.5, lines=0.5), [])


def test_line_aligned_rows_start_their_first_block_at_a_line(tmp_path):
    """line_aligned=1: each row is the window drawn without the option moved forward to the first line start at or
    after its block's start; line_aligned=0 draws exactly the rows drawn before the option."""
    f = tmp_path / "m.py"
    f.write_text(CODE * 6)
    tok = Tokenizer.byte_level()
    newline = tok.encode("\n")[0]
    assert tok.line_starts(tok.vocab_size + 3)[newline] and len(tok.line_starts(tok.vocab_size + 3)) == \
        tok.vocab_size + 3 and sum(tok.line_starts()) == 1
    shape = Shape(canvas_length=8, blocks=2, min_prefix=5, max_prefix=5)
    plain = TextData([f], tok).batch(shape, 0, 3, 0, range(16)).ids
    aligned = TextData([f], tok, line_aligned=1.0).batch(shape, 0, 3, 0, range(16)).ids
    assert torch.equal(plain, TextData([f], tok, line_aligned=0.0).batch(shape, 0, 3, 0, range(16)).ids)
    stream = TextData([f], tok).stream.long()
    for before, after in zip(plain, aligned):
        start = next(i for i in range(len(stream)) if torch.equal(stream[i:i + 21], before))
        moved = next(i for i in range(start, len(stream)) if stream[i + 5] == newline)
        assert torch.equal(after, stream[moved:moved + 21])
    assert (aligned[:, 5] == newline).all() and not (plain[:, 5] == newline).all()


@pytest.mark.parametrize("objective", [{"span": 0.5}, {"span": 0.5, "lines": 0.5}])
def test_span_objective_trains(tmp_path, objective):
    cfg = write_config(tmp_path, train={"steps": 2, "save_every": 2, "eval_every": 2}, objective=objective)
    t = run(cfg)
    assert all(torch.isfinite(torch.tensor(v)) for v in t.history["loss"])
