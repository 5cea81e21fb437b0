"""`dgemma chat`: a terminal conversation that shows each answer's draft refining in place.

Owns: the read-answer loop over a text stream (`/reset` forgets the conversation, `/exit` or end of input stops),
redrawing the draft after every denoising step on a terminal (committed canvases plain, the current canvas dimmed,
with its canvas and step numbers), and printing reasoning apart from the answer.
On a stream that is not a terminal only the final answers are printed.
Must not: implement generation or templates itself; it calls `Model.chat` with an `on_step` callback.
"""

from __future__ import annotations

from typing import TextIO

from ..api import Model
from ..engine.generate import StepEvent
from ..engine.prefix import PrefixCache
from .text import Choice, channel_ids

SAVE, RESTORE_AND_CLEAR, DIM, PLAIN = "\x1b7", "\x1b8\x1b[J", "\x1b[2m", "\x1b[0m"


class _DraftView:
    """Redraws one answer in place: the committed canvases, then the current canvas's draft."""

    def __init__(self, model: Model, out: TextIO):
        self.tok, self.out = model.tokenizer, out
        self.eos = set(model.config.eos_token_ids)
        self.committed: list[int] = []
        self.canvas, self.last = 0, []
        out.write(SAVE)

    def _until_eos(self, ids: list[int]) -> list[int]:
        return next((ids[:i] for i, t in enumerate(ids) if t in self.eos), ids)

    def step(self, event: StepEvent) -> None:
        if event.canvas_index != self.canvas:
            self.committed += self._until_eos(self.last)
            self.canvas = event.canvas_index
        self.last = event.draft[0].tolist()
        done = self.tok.decode(self.committed)
        draft = self.tok.decode(self._until_eos(self.last))
        self.out.write(f"{RESTORE_AND_CLEAR}{done}{DIM}{draft}  [canvas {event.canvas_index + 1}, "
                       f"step {event.step}]{PLAIN}")
        self.out.flush()

    def clear(self) -> None:
        self.out.write(RESTORE_AND_CLEAR)


def chat(model: Model, stdin: TextIO, stdout: TextIO, *, thinking: bool = False, **settings) -> int:
    """Run the conversation loop until /exit or end of input; `settings` go to `Model.chat` (None = default)."""
    tok = model.tokenizer
    if tok is None or tok.chat_template is None:
        raise ValueError("dgemma chat needs a checkpoint with a tokenizer and a chat template")
    live = stdout.isatty()
    channel = channel_ids(tok)
    history: list[dict] = []
    prefix = PrefixCache(capacity=2)  # each turn's prompt extends the last one: only the new turn is encoded
    stdout.write("dgemma chat: /reset forgets the conversation, /exit or Ctrl-D ends it\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return 0
        line = line.strip()
        if line == "/exit":
            return 0
        if line == "/reset":
            history.clear()
            stdout.write("(conversation cleared)\n")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        stdout.write("model> ")
        view = _DraftView(model, stdout) if live else None
        result = model.chat(history, thinking=thinking, on_step=view.step if view else None, prefix_cache=prefix,
                            **settings).result
        if view:
            view.clear()
        answer = Choice(tok, channel=channel)
        reasoning, text = answer.feed(result.token_ids[0], True)
        if reasoning:
            stdout.write(f"{DIM if live else ''}(thinking) {reasoning}{PLAIN if live else ''}\n       ")
        stdout.write(f"{text}\n")
        history.append({"role": "assistant", "content": text})
