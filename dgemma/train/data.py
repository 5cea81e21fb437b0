"""Training data: text/code files packed into one token stream, or JSONL chats with assistant-only supervision.

Owns: reading and tokenizing the sources (with errors naming the glob, file and line), the held-out split, and
building batches as a pure function of (seed, step, micro-batch, row): any rank of a data-parallel run and any
resumed run sees exactly the same rows, so nothing about the data order needs saving.
Must not: run the model or hold optimiser state.
"""

from __future__ import annotations

import glob
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tokenizer import Tokenizer
from .objective import Batch


def expand_globs(patterns: list[str], what: str) -> list[Path]:
    """Sorted files matched by the glob patterns (recursive `**` allowed); "stdlib:train" / "stdlib:heldout" /
    "stdlib:library" name the running interpreter's standard library split (see stdlib.py). An error names a pattern
    with no match."""
    files: set[Path] = set()
    for pattern in patterns:
        if pattern.startswith("stdlib:"):
            from .stdlib import stdlib_files

            matched = stdlib_files(pattern.removeprefix("stdlib:"))
        else:
            matched = [Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True)
                       if Path(p).is_file()]
        if not matched:
            raise ValueError(f"{what}: the glob {pattern!r} matches no files")
        files.update(matched)
    return sorted(files)


def stream_seed(*parts: int) -> int:
    """A reproducible 62-bit seed for a tuple of integers (seed, step, micro-batch, row, ...)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % (2**61 - 1)
    return value


def _row_generator(seed: int, step: int, micro: int, row: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, step, micro, row))


@dataclass
class Shape:
    canvas_length: int
    blocks: int  # supervised blocks per sequence
    min_prefix: int
    max_prefix: int

    def prefix_for(self, seed: int, step: int, micro: int) -> int:
        """The prefix length shared by one micro-batch (drawn per step so all lengths get trained)."""
        gen = torch.Generator().manual_seed(stream_seed(seed, step, micro, -1))
        return int(torch.randint(self.min_prefix, self.max_prefix + 1, (1,), generator=gen))


class TextData:
    """Documents as [bos] + tokens + [eos], concatenated into one stream; rows are random windows of it. With
    probability `line_aligned` a row's window moves forward so that its first block starts a line (at the next
    token whose text begins with a newline), the place where a prompt ends and generation or an infill hole begins;
    a window that cannot move stays where it was."""

    def __init__(self, files: list[Path], tokenizer: Tokenizer, line_aligned: float = 0.0, name: str = "training"):
        self.name = name  # for errors: "training" or "held-out"
        docs = []
        for f in files:
            try:
                docs.append(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError) as err:
                raise ValueError(f"{f}: cannot read as UTF-8 text ({err})") from None
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = tokenizer.eos_token_ids[:1]
        stream = []
        for enc in tokenizer.backend.encode_batch(docs, add_special_tokens=False):
            stream.extend(bos + enc.ids + eos)
        self.stream = torch.tensor(stream, dtype=torch.int32)
        self.files = files
        self.line_aligned = line_aligned
        if line_aligned > 0:
            self.line_positions = torch.tensor(tokenizer.line_starts())[self.stream].nonzero().flatten()

    def __len__(self) -> int:
        return int(self.stream.numel())

    def check_width(self, width: int) -> None:
        """ValueError unless the stream holds a window of `width` tokens."""
        if len(self) <= width:
            raise ValueError(f"the {self.name} text has {len(self)} tokens, fewer than one sequence of {width}")

    def batch(self, shape: Shape, seed: int, step: int, micro: int, rows: range) -> Batch:
        prefix = shape.prefix_for(seed, step, micro)
        width = prefix + shape.blocks * shape.canvas_length
        self.check_width(width)
        ids = []
        for row in rows:
            gen = _row_generator(seed, step, micro, row)
            start = int(torch.randint(0, len(self) - width, (1,), generator=gen))
            if self.line_aligned > 0 and torch.rand(1, generator=gen).item() < self.line_aligned:
                start = self._aligned(start, prefix, width)
            ids.append(self.stream[start:start + width].long())
        ids = torch.stack(ids)
        ones = torch.ones_like(ids, dtype=torch.bool)
        return Batch(ids, ones, ones.clone(), shape.blocks)

    def _aligned(self, start: int, prefix: int, width: int) -> int:
        """`start` moved forward so that position start + prefix is the next line start, when the window fits."""
        i = int(torch.searchsorted(self.line_positions, start + prefix))
        if i < len(self.line_positions) and int(self.line_positions[i]) - prefix + width < len(self):
            return int(self.line_positions[i]) - prefix
        return start


class ChatData:
    """JSONL lines {"messages": [...]}; the prompt (everything before an assistant turn) goes in the prefix, the
    assistant's reply + EOS starts at the first block and is the only supervised text (plus the pad after it)."""

    def __init__(self, files: list[Path], tokenizer: Tokenizer, skip_bad_lines: bool = False, name: str = "training"):
        if tokenizer.chat_template is None:
            raise ValueError("chat data needs a tokenizer with a chat template")
        self.name = name  # for messages: "training" or "held-out"
        self.tokenizer = tokenizer
        self.examples: list[tuple[list[int], list[int]]] = []  # (prompt ids, reply ids incl. EOS)
        for f in files:
            for number, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    self.examples.extend(self._parse(line))
                except ValueError as err:
                    message = f"{f}:{number}: {err}"
                    if not skip_bad_lines:
                        raise ValueError(message + " (set data.skip_bad_lines = true to skip such lines)") from None
                    print(f"dgemma train: skipping {message}", file=sys.stderr)
        if not self.examples:
            raise ValueError(f"{name} chat data: no usable examples (each needs an assistant message)")

    def _parse(self, line: str) -> list[tuple[list[int], list[int]]]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"malformed JSON ({err.msg})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError("expected an object with a non-empty 'messages' list")
        tok = self.tokenizer
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") != "assistant":
                continue
            before = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
            reply = message.get("content")
            if not isinstance(reply, str):
                raise ValueError(f"messages[{i}] (assistant) content must be a string")
            prompt = tok.encode(before) if before else [tok.bos_token_id or 0]
            out.append((prompt, tok.encode(reply) + tok.eos_token_ids[:1]))
        if not out:
            raise ValueError("no assistant message to learn from")
        return out

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, shape: Shape, seed: int, step: int, micro: int, rows: range) -> Batch:
        """Rows of (context, `shape.blocks` blocks of reply). A reply longer than the blocks gives a random run of
        them, canvas-aligned as generation commits them, with the reply before it moved into the context; every
        block, the one holding EOS included, gets trained. A context over `shape.max_prefix` keeps its first token
        (BOS) and its end."""
        c, pad, span = shape.canvas_length, self.tokenizer.pad_token_id or 0, shape.blocks * shape.canvas_length
        picked = []
        for r in rows:
            gen = _row_generator(seed, step, micro, r)
            prompt, reply = self.examples[int(torch.randint(0, len(self), (1,), generator=gen))]
            first = int(torch.randint(0, max(1, -(-len(reply) // c) - shape.blocks + 1), (1,), generator=gen))
            picked.append((prompt + reply[:first * c], reply[first * c:first * c + span]))
        prefix = min(shape.max_prefix, max(len(p) for p, _ in picked))
        ids = torch.full((len(picked), prefix + span), pad, dtype=torch.long)
        valid = torch.zeros_like(ids, dtype=torch.bool)
        supervise = torch.zeros_like(ids, dtype=torch.bool)
        for i, (context, reply) in enumerate(picked):
            if len(context) > prefix:
                context = (context[:1] + context[len(context) - prefix + 1:])[:prefix]
            ids[i, prefix - len(context):prefix] = torch.tensor(context, dtype=torch.long)
            ids[i, prefix:prefix + len(reply)] = torch.tensor(reply, dtype=torch.long)
            valid[i, prefix - len(context):] = True
            used = -(-len(reply) // c) * c  # the reply's blocks, with the pad after its EOS
            supervise[i, prefix:prefix + used] = True
        return Batch(ids, supervise, valid, shape.blocks)
