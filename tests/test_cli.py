"""`dgemma run`, `info` and `init` on a random tiny checkpoint with a byte-level tokenizer made here."""

import json
import shutil
import subprocess

import pytest

import dgemma
from dgemma.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["init", str(path), "--preset", "tiny", "--seed", "1"]) == 0
    return path


def test_init_writes_a_loadable_checkpoint_with_tokenizer(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "chat_template.jinja"} <= names
    model = dgemma.load(tiny_dir)
    assert model.tokenizer is not None and model.config.canvas_length == 32


def test_run_prints_text_and_stats(tiny_dir, capsys):
    assert main(["run", "def fib(n):", "--model", str(tiny_dir), "--max-new-tokens", "40", "--steps", "4",
                 "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    assert "tokens in" in err and "tokens/forward" in err and "steps per canvas" in err
    again = main(["run", "def fib(n):", "--model", str(tiny_dir), "--max-new-tokens", "40", "--steps", "4",
                  "--seed", "0"])
    assert again == 0 and capsys.readouterr().out == out  # same seed, same text


def test_run_json_chat_and_ids(tiny_dir, capsys):
    assert main(["run", "hello", "--model", str(tiny_dir), "--chat", "--json", "--max-new-tokens", "7",
                 "--steps", "3", "--seed", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"text", "token_ids", "tokens_per_forward", "steps_per_canvas", "finish_reason"}
    assert len(data["token_ids"]) <= 7 and isinstance(data["text"], str)
    assert main(["run", "5, 6 7", "--ids", "--model", str(tiny_dir), "--max-new-tokens", "5", "--steps", "2",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) <= 5


def test_info_reports_parameters_and_bytes(tiny_dir, capsys):
    assert main(["info", "--model", str(tiny_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    total, active = dgemma.load(tiny_dir).config.parameter_counts()
    assert data["total_parameters"] == total and data["active_parameters"] == active < total
    assert data["dtype"] == "float32" and data["weight_bytes"] >= 4 * total
    assert main(["info", "--model", str(tiny_dir), "--dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weight_bytes"] == data["weight_bytes"] // 2
    assert main(["info", "--model", str(tiny_dir)]) == 0
    assert "active per token" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["run", "x", "--model", "/nonexistent/dir"], "no checkpoint directory"),
    (["run", "1 two", "--ids", "--model", "{tiny}"], "--ids expects integers"),
    (["run", "x", "--model", "{tiny}", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["run", "", "--model", "{tiny}"], "empty prompt"),
    (["info", "--model", "/nonexistent/dir"], "no checkpoint directory"),
    (["run", "x", "--model", "/nonexistent/model.gguf"], "no GGUF file at /nonexistent/model.gguf"),
    (["run", "x", "--model", "{tiny}", "--device", "tpu"], "unknown device 'tpu'; expected e.g. cpu, cuda"),
    (["run", "x", "--model", "{tiny}", "--device", "cuda:99"], "device 'cuda:99': "),  # no GPU, or not 100 of them
])
def test_errors_are_one_line_with_exit_code_2(tiny_dir, capsys, argv, match):
    argv = [a.replace("{tiny}", str(tiny_dir)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


def test_text_prompt_without_a_tokenizer_points_to_ids(tiny_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "tokenizer.json").unlink()
    assert main(["run", "hello", "--model", str(bare)]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no tokenizer" in err and "--tokenizer" in err and "--ids" in err and len(err.splitlines()) == 1
    assert main(["run", "5 6", "--ids", "--model", str(bare), "--max-new-tokens", "3", "--steps", "2"]) == 0


def test_a_tokenizer_can_come_from_elsewhere(tiny_dir, tmp_path, capsys):
    from dgemma.api import BUNDLED

    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "tokenizer.json").unlink()
    args = ["run", "hello", "--max-new-tokens", "6", "--steps", "3", "--seed", "0", "--json"]
    assert main(args + ["--model", str(tiny_dir)]) == 0
    own = json.loads(capsys.readouterr().out)
    for tokenizer in (tiny_dir, tiny_dir / "tokenizer.json"):  # a directory, or its tokenizer.json
        assert main(args + ["--model", str(bare), "--tokenizer", str(tokenizer)]) == 0
        assert json.loads(capsys.readouterr().out)["text"] == own["text"]
    assert main(["info", "--model", str(bare), "--tokenizer", str(tiny_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer"] is True
    # A directory without one, and a tokenizer with more ids than the model has, are refused by name.
    assert main(args + ["--model", str(tiny_dir), "--tokenizer", str(bare)]) == 2
    assert f"{bare}: no tokenizer.json" in capsys.readouterr().err
    assert main(args + ["--model", str(tiny_dir), "--tokenizer", str(BUNDLED)]) == 2
    assert "has 2048 token ids; the model has 512" in capsys.readouterr().err
    assert main(args + ["--model", str(tiny_dir), "--tokenizer", str(tiny_dir / "config.json")]) == 2
    assert "config.json: give a directory holding tokenizer.json, that file, or a Hub" in capsys.readouterr().err


def test_a_port_out_of_range_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--port", "99999"])
    assert exit_.value.code == 2 and "a port is a whole number from 0 to 65535, got '99999'" in capsys.readouterr().err


def test_version(capsys):
    import dgemma

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"dgemma {dgemma.__version__} (torch ")


def test_console_script_is_installed(tiny_dir):
    exe = shutil.which("dgemma")
    assert exe, "the dgemma console script is not on PATH"
    proc = subprocess.run([exe, "info", "--model", str(tiny_dir)], capture_output=True, text=True)
    assert proc.returncode == 0 and "parameters" in proc.stdout


def test_run_without_model_uses_the_bundled_model(capsys):
    from dgemma.api import BUNDLED

    assert (BUNDLED / "model.safetensors").is_file(), "the package ships a trained model"
    size = sum(p.stat().st_size for p in BUNDLED.iterdir())
    assert size <= 25 * 2**20, f"the bundled model takes {size / 2**20:.1f} MiB"
    assert main(["run", "def fib(n):", "--max-new-tokens", "12", "--steps", "4", "--seed", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert 0 < len(data["token_ids"]) <= 12 or data["finish_reason"] == "stop"


def test_load_without_a_path_loads_the_bundled_model(tmp_path, monkeypatch):
    import dgemma.api

    model = dgemma.load()
    assert str(model.path) == str(dgemma.api.BUNDLED) and model.tokenizer is not None
    monkeypatch.setattr(dgemma.api, "BUNDLED", tmp_path / "missing")
    with pytest.raises(ValueError, match="no model given and this install has no bundled model"):
        dgemma.load()
    assert main(["run", "x"]) == 2


def test_a_hub_tokenizer_downloads_no_weights(tiny_dir, monkeypatch):
    import huggingface_hub

    from dgemma import checkpoint
    from dgemma.api import load_tokenizer

    asked = []

    def fake_download(repo_id, allow_patterns):  # stands in for the Hub: no network in tests
        asked.append((repo_id, allow_patterns))
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    tok = load_tokenizer("org/model", vocab_size=512)
    assert tok.encode("hello") == load_tokenizer(tiny_dir).encode("hello")
    assert checkpoint.resolve("org/model") == tiny_dir
    (_, tokenizer_patterns), (_, checkpoint_patterns) = asked
    assert "*.safetensors" in checkpoint_patterns and "*.safetensors" not in tokenizer_patterns
    assert {"tokenizer*", "*.json", "*.jinja"} <= set(tokenizer_patterns)
