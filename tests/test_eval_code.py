"""The standard-library corpus split, the eval-code helpers on a hand-written file, and a small run on a random
tiny checkpoint (structure, rates in [0, 1], a train-only baseline, deterministic sample selection)."""

import json
import warnings

import pytest

import dgemma
from dgemma.cli import main
from dgemma.tokenizer import Tokenizer
from dgemma.train import eval_code as ec
from dgemma.train.stdlib import HELD_OUT_MODULES, TEST_DIRS, split_of, stdlib_files, stdlib_root

SOURCE = '''import os


def area(w, h):
    """Area of a rectangle."""
    # width times height
    result = w * h

    return result


class Box:
    def grow(self, by):
        """Grow every side."""
        text = """a
b"""
        self.size += by
        return self.size
'''


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("evalcode") / "tiny"
    assert main(["init", str(path), "--preset", "tiny", "--seed", "2"]) == 0
    return path


@pytest.fixture()
def box(tmp_path):
    path = tmp_path / "box.py"
    path.write_text(SOURCE, encoding="utf-8")
    return path


def _parts(path):
    return path.relative_to(stdlib_root()).parts


def test_split_is_disjoint_deterministic_and_keeps_held_out_tests_out():
    train, held = stdlib_files("train"), stdlib_files("heldout")
    assert train and held and not set(train) & set(held)
    assert train == sorted(train, key=lambda p: p.relative_to(stdlib_root()).as_posix()) == stdlib_files("train")
    assert {_parts(p)[0].removesuffix(".py") for p in held} == set(HELD_OUT_MODULES)
    assert not {_parts(p)[0].removesuffix(".py") for p in train} & set(HELD_OUT_MODULES)
    for path in train + held:
        assert "site-packages" not in _parts(path), path
    assert not any(TEST_DIRS & set(_parts(p)) for p in held)
    tests = [p for p in train if TEST_DIRS & set(_parts(p))]
    assert tests, "the test suites belong to the train split"
    names = {_parts(p)[-1] for p in tests}
    assert "test_csv.py" not in names and "test_textwrap.py" not in names and "test_heapq.py" not in names
    root = stdlib_root()
    assert split_of(root / "test" / "test_json" / "test_dump.py") is None
    assert split_of(root / "test" / "test_htmlparser.py") is None
    assert split_of(root / "test" / "test_os.py") == "train"
    assert split_of(root / "json" / "decoder.py") == "heldout"
    assert split_of(root / "os.py") == "train"
    library = stdlib_files("library")
    assert library == [p for p in train if p not in tests] and root / "os.py" in library
    with pytest.raises(ValueError, match="split"):
        stdlib_files("validation")


def test_helpers_on_a_small_file(box):
    assert ec.infill_lines(SOURCE) == [7, 9, 17, 18]  # no docstring, comment, blank or multi-line string line
    for n in ec.infill_lines(SOURCE):
        sample = ec.infill_sample(box, n)
        assert sample.prefix + sample.line + sample.suffix == SOURCE
        line, spliced = ec.splice_line(sample, sample.line + "\nmore text the first line ends before")
        assert line == sample.line and spliced == SOURCE
        assert ec.score_line(sample, sample.line) == {"parse": 1.0, "exact": 1.0, "similarity": 1.0}
    broken = ec.score_line(ec.infill_sample(box, 7), "    result = w *")
    assert broken["parse"] == 0.0 and broken["exact"] == 0.0 and 0 < broken["similarity"] < 1

    assert ec.completion_candidates(SOURCE) == [(4, 5, 9), (13, 14, 18)]
    tok = Tokenizer.byte_level()
    samples = ec.completion_samples([box], tok, limit=5, seed=0, max_body_tokens=200)
    assert sorted(s.lineno for s in samples) == [4, 13]
    for s in samples:
        assert SOURCE.startswith(s.prefix + s.body)
        generated = s.body + "\n" + " " * s.def_indent + "def after(self):\n" + " " * s.def_indent + "    pass\n"
        assert ec.cut_body(generated, s.def_indent) == s.body + "\n"
        assert ec.score_body(s, generated) == {"parse": 1.0}
        assert ec.score_body(s, "\n" + " " * s.def_indent + "x = 1\n") == {"parse": 0.0}  # empty body
        assert ec.score_body(s, " " * (s.def_indent + 4) + "# only a comment\n") == {"parse": 0.0}
        assert ec.score_body(s, " " * (s.def_indent + 4) + "return (1,\n") == {"parse": 0.0}
    bracket = "        x = f(1,\n2)\n        return x\n    def next(self):\n        pass\n"
    assert ec.cut_body(bracket, 4) == "        x = f(1,\n2)\n        return x\n"
    assert ec.completion_samples([box], tok, limit=5, seed=0, max_body_tokens=5) == []

    assert ec.most_common_lines([box]) == {4: "result = w * h", 8: "return self.size"}
    guess = ec.baseline_line(ec.infill_sample(box, 9), {4: "return result"})
    assert guess == "    return result"
    assert ec.baseline_line(ec.infill_sample(box, 9), {}) == "    "


def test_sample_selection_is_deterministic(tiny_dir):
    tok = dgemma.load(tiny_dir).tokenizer
    held = stdlib_files("heldout")
    a = ec.infill_samples(held, tok, limit=6, seed=1, max_fill=32)
    assert a == ec.infill_samples(held, tok, limit=6, seed=1, max_fill=32)
    assert a != ec.infill_samples(held, tok, limit=6, seed=2, max_fill=32)
    assert len(a) == 6 and all(1 <= len(tok.encode(s.line)) <= 32 for s in a)
    c = ec.completion_samples(held, tok, limit=4, seed=1, max_body_tokens=64)
    assert c == ec.completion_samples(held, tok, limit=4, seed=1, max_body_tokens=64)
    assert c != ec.completion_samples(held, tok, limit=4, seed=2, max_body_tokens=64)
    assert len(c) == 4 and all(len(tok.encode(s.body)) <= 64 for s in c)


def test_evaluate_on_a_tiny_checkpoint_with_a_train_only_baseline(tiny_dir, monkeypatch):
    splits, baseline_inputs = [], []
    real_files, real_common = ec.stdlib_files, ec.most_common_lines

    def files(split):
        splits.append(split)
        return real_files(split)

    def common(paths):
        baseline_inputs.append(list(paths))
        return real_common(baseline_inputs[-1])

    monkeypatch.setattr(ec, "stdlib_files", files)
    monkeypatch.setattr(ec, "most_common_lines", common)
    ec.train_baseline.cache_clear()
    model = dgemma.load(tiny_dir)
    seeds = {"infill": [], "generate": []}
    for name, calls in seeds.items():
        def record(*args, _call=getattr(model, name), _calls=calls, **kw):
            _calls.append(kw["seed"])
            return _call(*args, **kw)
        monkeypatch.setattr(model, name, record)
    report = ec.evaluate(model, limit=3, seed=4, steps=3, max_new_tokens=32, best_of=2)
    # each sample its own sampler seed, plain and best-of-2 (infill goes through generate too)
    assert seeds == {"infill": [4, 4, 5, 5, 6, 6], "generate": [4, 4, 5, 5, 6, 6, 4, 5, 6]}
    assert sorted(splits) == ["heldout", "train"]
    assert baseline_inputs == [real_files("train")]
    table = ec.train_baseline()

    held_names = {p.relative_to(stdlib_root()).as_posix() for p in real_files("heldout")}
    infill, completion = report["infill"], report["completion"]
    assert set(infill) == {"diffusion", "best_of", "ar", "baseline", "samples"}
    assert set(completion) == {"diffusion", "ar", "samples"}
    # best-of-2 counts both candidate rows' passes and their scoring passes: fewer tokens per forward
    assert infill["best_of"]["tokens_per_forward"] < infill["diffusion"]["tokens_per_forward"]
    for mode in ("diffusion", "best_of", "ar", "baseline"):
        m = infill[mode]
        assert m["n"] == 3
        for key in ("parse_rate", "exact_match", "edit_similarity"):
            assert 0.0 <= m[key] <= 1.0
    for mode in ("diffusion", "ar"):
        assert completion[mode]["n"] == 3 and 0.0 <= completion[mode]["parse_rate"] <= 1.0
        for task in (infill, completion):
            assert task[mode]["tokens"] > 0 and task[mode]["tokens_per_second"] > 0
            assert task[mode]["tokens_per_forward"] > 0
    assert infill["ar"]["tokens_per_forward"] == 1.0
    for row in infill["samples"]:
        assert row["path"] in held_names
        sample = ec.infill_sample(stdlib_root() / row["path"], row["lineno"])
        assert row["baseline"] == ec.baseline_line(sample, table)
        assert "\n" not in row["diffusion"] + row["best_of"] + row["ar"]
    assert all(row["path"] in held_names for row in completion["samples"])
    text = ec.format_table(report)
    assert "baseline" in text and "best-of-2" in text and "completion" in text and "tok/fwd" in text
    assert "best_of" not in ec.evaluate(model, limit=1, seed=4, steps=2, max_new_tokens=8, best_of=1)["infill"]


def test_rates_carry_their_standard_error():
    tally = ec._Tally()
    for parse in (1.0, 0.0, 1.0, 1.0):
        tally.add({"parse": parse})
    summary = tally.summary(4, timed=False)
    # sample standard deviation of (1, 0, 1, 1) is 0.5; over sqrt(4) samples: 0.25
    assert summary == {"n": 4, "parse_rate": 0.75, "parse_rate_stderr": 0.25}
    one = ec._Tally()
    one.add({"parse": 1.0})
    assert one.summary(1, timed=False)["parse_rate_stderr"] is None
    assert ec._rate(0.75, 0.25) == "0.750±0.250" and ec._rate(1.0, None) == "1.000" and ec._rate(None, None) == "-"


def test_cli_prints_one_json_object(tiny_dir, capsys):
    assert main(["eval-code", "--model", str(tiny_dir), "--limit", "2", "--steps", "2", "--max-new-tokens", "32",
                 "--seed", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["seed"] == 5 and report["config"]["steps"] == 2
    assert report["infill"]["diffusion"]["n"] == 2 and report["completion"]["ar"]["n"] == 2
    assert main(["eval-code", "--model", str(tiny_dir), "--limit", "0"]) == 2
    assert "limit must be a positive integer" in capsys.readouterr().err


def test_scanning_a_file_with_an_old_escape_prints_no_warning():
    """Library files hold escapes such as "\\(" that ast.parse warns about; listing holes and functions, and scoring,
    must stay quiet (Python 3.12 prints that SyntaxWarning by default)."""
    source = 'def f():\n    """Doc."""\n    x = "\\("\n    return x\n'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ec.infill_lines(source) == [3, 4]
        assert ec.completion_candidates(source) == [(1, 2, 4)]
        assert ec.parses(source)
    assert [str(w.message) for w in caught] == []
