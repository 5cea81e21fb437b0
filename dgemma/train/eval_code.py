"""Code evaluation on the held-out standard-library modules: single-line infill and docstring-to-body completion,
each in diffusion mode and in the same checkpoint's autoregressive mode, plus a trivial exact-match baseline.

Tasks
- Infill: one line of a function body is removed (never blank, comment-only, a docstring or inside a multi-line
  string). The text before it, up to but not including the newline before it, is the prompt (the encoder prefix);
  the hole is that newline plus the line (a byte-level BPE tokenizes a newline together with the next line's
  indentation, so this is where training text splits too); the text after the line (from its own newline on) is
  pinned in the canvas right after the hole through `Model.infill`. The hole has exactly the token count of newline
  + true line: this is length-conditioned infill, the length is given to the model. The first line of the filled
  text replaces the removed line. Metrics: the rate at which the spliced file parses (`ast.parse`), exact match of
  the stripped lines, and the mean edit similarity (difflib's SequenceMatcher ratio of the stripped lines).
  Best-of-N mode (`best_of` > 1) is diffusion with `Model.infill(best_of=N)`: N fills drawn in one batch, the one
  the model's own causal pass scores most likely with the suffix after it is kept (no parser or reference is
  consulted); its speed figures count every candidate row's passes and the scoring passes.
  AR mode gets the prefix only and greedily writes as many tokens as the hole has; its first line is taken.
  Baseline: the most common eligible line (stripped) at the removed line's indentation over the TRAIN split,
  re-indented like the removed line.
- Completion: for a function with a docstring, the prompt is the file up to the docstring's end (its final newline
  left for the model to write, as for infill); the model
  writes up to `max_new_tokens`; the text is cut before its first non-blank line indented at or below the `def`
  line (lines that continue a multi-line string or an open bracket do not count). Metric: the rate at which
  prompt + body parses, where a body with no code line counts as a failure (a docstring-only function parses
  trivially). Only functions whose true body fits in `max_new_tokens` are used.
Prompts are capped to their last `max_prefix_tokens` tokens (BOS kept first); parsing always uses the full text.
Samples are drawn deterministically: every candidate is listed in file and line order, shuffled with
`random.Random(seed)`, and the first `limit` that fit are kept (infill holes of 1..canvas_length tokens,
completion bodies of at most max_new_tokens tokens). The diffusion sampler of a task's i-th sample is seeded with
seed + i: one seed for every sample would give every sample the same starting noise, so the whole rate would move
with that one draw (on the bundled model, infill parse rates of 0.16 to 0.40 over nine seeds). Speed: tokens per
forward (diffusion: generated tokens over decoder passes, from the result; AR: one token per forward) and generated
tokens per second of model time.
Must not: train, or change the model, the sampler or the corpus split.
"""

from __future__ import annotations

import ast
import difflib
import functools
import io
import json
import math
import random
import statistics
import sys
import time
import tokenize
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..api import Model, load
from ..engine.ar import ar_generate
from ..tokenizer import Tokenizer
from .stdlib import parse_quietly, stdlib_files, stdlib_root

MODES = ("diffusion", "ar")
_OPEN, _CLOSE = {"(", "[", "{"}, {")", "]", "}"}


# ---- source helpers ----------------------------------------------------------------------------------------------
def split_lines(source: str) -> list[str]:
    """Lines with their endings, split the way the parser counts line numbers (\\n, \\r\\n or \\r)."""
    return io.StringIO(source, newline="").readlines()


def indent_of(line: str) -> int:
    """Width of the leading whitespace (a tab counts as one)."""
    return len(line) - len(line.lstrip(" \t"))


def is_code_line(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def parses(source: str) -> bool:
    """True when `ast.parse` accepts the source (syntax warnings ignored)."""
    try:
        parse_quietly(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


_SCOPES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstring(node) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def _functions(tree: ast.AST) -> Iterable[ast.FunctionDef | ast.AsyncFunctionDef]:
    return (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def infill_lines(source: str) -> list[int]:
    """Sorted 1-based numbers of the lines that may become holes: inside a function body (below its header), code
    (not blank or comment-only), and not part of a docstring or of any string literal spanning several lines."""
    tree = parse_quietly(source)
    lines = split_lines(source)
    strings = set()
    for node in ast.walk(tree):
        doc = _docstring(node) if isinstance(node, _SCOPES) else None
        if doc is not None:
            strings.update(range(doc.lineno, doc.end_lineno + 1))
        is_string = isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant)
                                                         and isinstance(node.value, (str, bytes)))
        if is_string and node.end_lineno > node.lineno:
            strings.update(range(node.lineno, node.end_lineno + 1))
    body = set()
    for fn in _functions(tree):
        if fn.body[0].lineno > fn.lineno:  # skip one-line functions: their body shares the `def` line
            body.update(range(fn.body[0].lineno, fn.end_lineno + 1))
    return sorted(n for n in body - strings if is_code_line(lines[n - 1]))


# ---- samples -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InfillSample:
    path: str  # relative to the standard library root when under it
    lineno: int  # 1-based number of the removed line
    prefix: str  # the text before the line, ending with the newline before it
    line: str  # the removed line, without its line ending
    suffix: str  # the rest of the file, from the removed line's ending on


@dataclass(frozen=True)
class CompletionSample:
    path: str
    lineno: int  # 1-based number of the `def` line
    prefix: str  # the file up to and including the docstring's last line (with its newline)
    def_indent: int  # indentation of the `def` line
    body: str  # the true body after the docstring


def _label(path: Path) -> str:
    try:
        return path.relative_to(stdlib_root()).as_posix()
    except ValueError:
        return str(path)


@functools.lru_cache(maxsize=64)
def _read(path: Path) -> str:
    """A held-out file's text (read once: samples come back to the same files)."""
    return path.read_text(encoding="utf-8")


def infill_sample(path: Path, lineno: int) -> InfillSample:
    """The hole at line `lineno` of a file: prefix + line + suffix is the file's text."""
    lines = split_lines(_read(path))
    whole = lines[lineno - 1]
    line = whole.rstrip("\r\n")
    return InfillSample(_label(path), lineno, "".join(lines[:lineno - 1]), line,
                        whole[len(line):] + "".join(lines[lineno:]))


def completion_candidates(source: str) -> list[tuple[int, int, int]]:
    """(def line, docstring's last line, function's last line) of every function with a docstring followed by code
    on later lines, sorted."""
    out = []
    for fn in _functions(parse_quietly(source)):
        doc = _docstring(fn)
        if doc is not None and len(fn.body) > 1 and fn.body[1].lineno > doc.end_lineno:
            out.append((fn.lineno, doc.end_lineno, fn.end_lineno))
    return sorted(out)


def _shuffled(candidates: list, seed: int) -> list:
    order = list(candidates)
    random.Random(seed).shuffle(order)
    return order


def infill_samples(paths: Sequence[Path], tokenizer: Tokenizer, *, limit: int, seed: int,
                   max_fill: int) -> list[InfillSample]:
    """Up to `limit` holes whose newline and line are 1..max_fill tokens long, drawn deterministically (module
    docstring)."""
    candidates = [(p, n) for p in paths for n in infill_lines(_read(p))]
    out = []
    for path, lineno in _shuffled(candidates, seed):
        if len(out) == limit:
            break
        sample = infill_sample(path, lineno)
        if 1 <= len(tokenizer.encode("\n" + sample.line)) <= max_fill:  # the hole holds the newline too
            out.append(sample)
    return out


def completion_samples(paths: Sequence[Path], tokenizer: Tokenizer, *, limit: int, seed: int,
                       max_body_tokens: int) -> list[CompletionSample]:
    """Up to `limit` functions with a docstring whose true body is at most `max_body_tokens` tokens."""
    candidates = [(p, c) for p in paths for c in completion_candidates(_read(p))]
    out = []
    for path, (def_line, doc_end, end) in _shuffled(candidates, seed):
        if len(out) == limit:
            break
        lines = split_lines(_read(path))
        body = "".join(lines[doc_end:end])
        if len(tokenizer.encode(body)) <= max_body_tokens:
            out.append(CompletionSample(_label(path), def_line, "".join(lines[:doc_end]),
                                        indent_of(lines[def_line - 1]), body))
    return out


# ---- splicing and scoring ----------------------------------------------------------------------------------------
def splice_line(sample: InfillSample, filled: str) -> tuple[str, str]:
    """(first line of the filled text, the file with it in place of the removed line)."""
    line = filled.split("\n", 1)[0].rstrip("\r")
    return line, sample.prefix + line + sample.suffix


def score_line(sample: InfillSample, line: str) -> dict:
    """parse (0/1), exact (0/1) and similarity in [0, 1] of a candidate for the removed line."""
    _, source = splice_line(sample, line)
    a, b = line.strip(), sample.line.strip()
    return {"parse": float(parses(source)), "exact": float(a == b),
            "similarity": difflib.SequenceMatcher(None, a, b).ratio()}


def _continuation_rows(text: str) -> set[int]:
    """1-based rows that continue a statement begun above them: inside a multi-line string or an open bracket.
    Tokenizing stops quietly where the text stops being valid; later rows count as fresh lines."""
    rows, depth = set(), 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            first, last = tok.start[0], tok.end[0]
            rows.update(range(first + 1, last + 1))  # a token spanning rows: a multi-line string
            if tok.type == tokenize.OP and tok.string in _OPEN:
                depth += 1
            elif tok.type == tokenize.OP and tok.string in _CLOSE:
                depth = max(depth - 1, 0)
            elif tok.type == tokenize.NL and depth > 0:
                rows.add(first + 1)
    except (tokenize.TokenError, SyntaxError):
        pass
    return rows


def cut_body(generated: str, def_indent: int) -> str:
    """The generated text up to (not including) its first non-blank line that is indented at or below `def_indent`
    and is not the continuation of a string or bracket opened above it."""
    continued = _continuation_rows(generated)
    kept = []
    for row, line in enumerate(split_lines(generated), start=1):
        if line.strip() and indent_of(line) <= def_indent and row not in continued:
            break
        kept.append(line)
    return "".join(kept)


def score_body(sample: CompletionSample, generated: str) -> dict:
    """parse (0/1): the cut body holds a code line and prefix + body parses."""
    body = cut_body(generated, sample.def_indent)
    ok = any(is_code_line(line) for line in split_lines(body)) and parses(sample.prefix + body)
    return {"parse": float(ok)}


# ---- the trivial baseline ----------------------------------------------------------------------------------------
def most_common_lines(paths: Iterable[Path]) -> dict[int, str]:
    """For each indentation width, the most common stripped eligible hole line (`infill_lines`) over `paths`
    (ties: the alphabetically first)."""
    counts: dict[int, Counter] = defaultdict(Counter)
    for path in paths:
        source = Path(path).read_text(encoding="utf-8")
        lines = split_lines(source)
        for n in infill_lines(source):
            counts[indent_of(lines[n - 1])][lines[n - 1].strip()] += 1
    return {width: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for width, c in sorted(counts.items())}


@functools.lru_cache(maxsize=1)
def train_baseline() -> dict[int, str]:
    """`most_common_lines` over the train split, computed once per process."""
    return most_common_lines(stdlib_files("train"))


def baseline_line(sample: InfillSample, table: dict[int, str]) -> str:
    """The baseline's guess, indented like the removed line (empty when no train line had that indentation)."""
    width = indent_of(sample.line)
    return sample.line[:width] + table.get(width, "")


# ---- running the model -------------------------------------------------------------------------------------------
class _Progress:
    """tqdm on stderr when installed, else a plain counter; silent when disabled."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.bar = total, enabled, 0, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc="eval-code", file=sys.stderr, leave=False)

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(f"\reval-code {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


class _Tally:
    """Per (task, mode): summed scores, generated tokens, forwards and model seconds."""

    def __init__(self):
        self.scores: dict[str, list[float]] = defaultdict(list)
        self.tokens = self.forwards = 0.0
        self.seconds = 0.0

    def add(self, scores: dict, tokens: float = 0.0, forwards: float = 0.0, seconds: float = 0.0) -> None:
        for key, value in scores.items():
            self.scores[key].append(value)
        self.tokens += tokens
        self.forwards += forwards
        self.seconds += seconds

    def summary(self, n: int, timed: bool) -> dict:
        """{"n", each metric's mean and its standard error ("<metric>_stderr": the sample standard deviation over
        sqrt(n); None below 2 samples), and with `timed` the token, time and speed figures}."""
        names = {"parse": "parse_rate", "exact": "exact_match", "similarity": "edit_similarity"}
        out: dict = {"n": n}
        for key, values in self.scores.items():
            out[names[key]] = statistics.fmean(values) if values else None
            out[names[key] + "_stderr"] = statistics.stdev(values) / math.sqrt(len(values)) \
                if len(values) > 1 else None
        if timed:
            out["tokens"] = int(round(self.tokens))
            out["seconds"] = round(self.seconds, 4)
            out["tokens_per_second"] = self.tokens / self.seconds if self.seconds > 0 else None
            out["tokens_per_forward"] = self.tokens / self.forwards if self.forwards > 0 else None
        return out


def _prompt(tokenizer: Tokenizer, model: Model, text: str, cap: int) -> list[int]:
    """Token ids of `text`, cut to its last `cap` tokens, BOS first when the model has one."""
    ids = tokenizer.encode(text)
    bos = model.config.bos_token_id
    if bos is None:
        return ids[-cap:]
    return [bos] + ids[max(len(ids) - (cap - 1), 0):]


def _without_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def _after_newline(generated: str) -> str:
    """Generated text continuing a prompt that stopped before a newline: drop that one leading newline."""
    return generated[1:] if generated.startswith("\n") else generated


def _diffusion(call, *args, **kw):
    start = time.perf_counter()
    result = call(*args, **kw)
    seconds = time.perf_counter() - start
    forwards = sum(result.steps[0])
    # tokens_per_forward counts every generated non-pad token (an EOS included) over the decoder passes.
    return result.token_ids[0], {"tokens": result.tokens_per_forward[0] * forwards, "forwards": forwards,
                                 "seconds": seconds}


def _ar(model: Model, prompt: list[int], n: int):
    start = time.perf_counter()
    result = ar_generate(model.net, prompt, n)
    seconds = time.perf_counter() - start
    tokens = len(result.token_ids[0])
    # One token per forward by construction: a pass that produced the stop id produced one token too.
    return result.token_ids[0], {"tokens": tokens, "forwards": tokens, "seconds": seconds}


def evaluate(model: Model, *, limit: int = 50, seed: int = 0, steps: int | None = None,
             max_prefix_tokens: int = 1024, max_new_tokens: int = 128, best_of: int = 4, progress: bool = False,
             files: Sequence[Path] | None = None, baseline: dict[int, str] | None = None) -> dict:
    """Run both tasks on up to `limit` samples each from `files` (default: the held-out split) in both modes and
    return the report: {"config": ..., "infill": {"diffusion"|"best_of"|"ar"|"baseline": metrics, "samples": [...]},
    "completion": {"diffusion"|"ar": metrics, "samples": [...]}, "wall_seconds": float}; "best_of" (infill by the
    best of `best_of` fills) only when `best_of` > 1. `steps` caps the denoising steps (default: the checkpoint's);
    `baseline` defaults to `train_baseline()`."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("eval-code needs a checkpoint with a tokenizer (tokenizer.json)")
    for name, value in (("limit", limit), ("max_prefix_tokens", max_prefix_tokens),
                        ("max_new_tokens", max_new_tokens), ("best_of", best_of)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    model.settings.replace(max_denoising_steps=steps)  # checks `steps` now, not after the samples are built
    c, context = model.config.canvas_length, model.config.max_position_embeddings
    if max_prefix_tokens + -(-max_new_tokens // c) * c > context:
        raise ValueError(f"max_prefix_tokens {max_prefix_tokens} and max_new_tokens {max_new_tokens} (canvases of "
                         f"{c}) exceed the model's context of {context} positions")
    start = time.perf_counter()
    files = stdlib_files("heldout") if files is None else list(files)
    table = train_baseline() if baseline is None else baseline
    holes = infill_samples(files, tok, limit=limit, seed=seed, max_fill=model.config.canvas_length)
    funcs = completion_samples(files, tok, limit=limit, seed=seed, max_body_tokens=max_new_tokens)
    infill_modes = ("diffusion", "best_of", "ar") if best_of > 1 else MODES
    bar = _Progress(len(infill_modes) * len(holes) + 2 * len(funcs), progress)
    tallies = {(task, mode): _Tally() for task in ("infill", "completion") for mode in (*infill_modes, "baseline")}

    infill_rows = []
    for i, sample in enumerate(holes):
        # The hole holds the newline before the line too, so prompt, hole and suffix split where training text
        # tokenizes apart (a byte-level BPE merges a newline with the next line's indentation).
        prompt = _prompt(tok, model, _without_newline(sample.prefix), max_prefix_tokens)
        hole = len(tok.encode("\n" + sample.line))
        row = {"path": sample.path, "lineno": sample.lineno, "truth": sample.line}
        ids, stats = _diffusion(model.infill, prompt, tok.encode(sample.suffix), hole,
                                max_denoising_steps=steps, seed=seed + i)
        bar.step()
        row["diffusion"] = splice_line(sample, _after_newline(tok.decode(ids)))[0]
        tallies["infill", "diffusion"].add(score_line(sample, row["diffusion"]), **stats)
        if best_of > 1:
            ids, stats = _diffusion(model.infill, prompt, tok.encode(sample.suffix), hole, best_of=best_of,
                                    max_denoising_steps=steps, seed=seed + i)
            bar.step()
            row["best_of"] = splice_line(sample, _after_newline(tok.decode(ids)))[0]
            tallies["infill", "best_of"].add(score_line(sample, row["best_of"]), **stats)
        ids, stats = _ar(model, prompt, hole)
        bar.step()
        row["ar"] = splice_line(sample, _after_newline(tok.decode(ids)))[0]
        tallies["infill", "ar"].add(score_line(sample, row["ar"]), **stats)
        row["baseline"] = baseline_line(sample, table)
        tallies["infill", "baseline"].add(score_line(sample, row["baseline"]))
        infill_rows.append(row)

    completion_rows = []
    for i, sample in enumerate(funcs):
        prompt = _prompt(tok, model, _without_newline(sample.prefix), max_prefix_tokens)  # see infill above
        row = {"path": sample.path, "lineno": sample.lineno}
        ids, stats = _diffusion(model.generate, [prompt], max_new_tokens=max_new_tokens,
                                max_denoising_steps=steps, seed=seed + i)
        bar.step()
        row["diffusion"] = cut_body(_after_newline(tok.decode(ids)), sample.def_indent)
        tallies["completion", "diffusion"].add(score_body(sample, row["diffusion"]), **stats)
        ids, stats = _ar(model, prompt, max_new_tokens)
        bar.step()
        row["ar"] = cut_body(_after_newline(tok.decode(ids)), sample.def_indent)
        tallies["completion", "ar"].add(score_body(sample, row["ar"]), **stats)
        completion_rows.append(row)
    bar.close()

    return {
        "config": {"seed": seed, "limit": limit, "steps": steps or model.settings.max_denoising_steps,
                   "max_prefix_tokens": max_prefix_tokens, "max_new_tokens": max_new_tokens, "best_of": best_of,
                   "canvas_length": model.config.canvas_length, "files": len(files)},
        "infill": {**{m: tallies["infill", m].summary(len(holes), m != "baseline")
                      for m in (*infill_modes, "baseline")},
                   "samples": infill_rows},
        "completion": {**{m: tallies["completion", m].summary(len(funcs), True) for m in MODES},
                       "samples": completion_rows},
        "wall_seconds": round(time.perf_counter() - start, 3),
    }


# ---- output and the command --------------------------------------------------------------------------------------
def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _rate(value, stderr) -> str:
    """A mean with its standard error: "0.270±0.045" ("-" without a value)."""
    if value is None:
        return "-"
    return f"{value:.3f}" if stderr is None else f"{value:.3f}±{stderr:.3f}"


def format_table(report: dict) -> str:
    """The report's metrics as a fixed-width table."""
    cfg = report["config"]
    lines = [f"held-out files {cfg['files']}, seed {cfg['seed']}, steps {cfg['steps']}, "
             f"prefix cap {cfg['max_prefix_tokens']} tokens, completion budget {cfg['max_new_tokens']} tokens",
             f"{'task':<11}{'mode':<10}{'n':>4}{'parse':>13}{'exact':>13}{'edit':>13}{'tok/fwd':>9}{'tok/s':>10}"]
    infill_modes = [m for m in ("diffusion", "best_of", "ar", "baseline") if m in report["infill"]]
    for task, modes in (("infill", infill_modes), ("completion", MODES)):
        for mode in modes:
            m = report[task][mode]
            label = f"best-of-{cfg['best_of']}" if mode == "best_of" else mode
            rates = [_rate(m.get(k), m.get(k + "_stderr")) for k in ("parse_rate", "exact_match", "edit_similarity")]
            speed = [_cell(m.get(k), f) for k, f in (("tokens_per_forward", ".2f"), ("tokens_per_second", ".1f"))]
            lines.append(f"{task:<11}{label:<10}{m['n']:>4}{rates[0]:>13}{rates[1]:>13}{rates[2]:>13}{speed[0]:>9}"
                         f"{speed[1]:>10}")
    lines.append(f"wall time {report['wall_seconds']:.1f} s; ± is one standard error over the samples")
    return "\n".join(lines)


def cmd_eval_code(args) -> int:
    """`dgemma eval-code`: load the model, evaluate, print the table (or one JSON object with --json)."""
    model = load(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    report = evaluate(model, limit=args.limit, seed=args.seed, steps=args.steps,
                      max_prefix_tokens=args.max_prefix_tokens, max_new_tokens=args.max_new_tokens,
                      best_of=args.best_of, progress=True)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
    return 0

