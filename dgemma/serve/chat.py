"""`dgemma chat`: a terminal conversation that shows each answer's draft refining in place.

Owns: the read-answer loop over a text stream (`/reset` forgets the conversation, `/exit`, `/quit` or end of input
stops), redrawing the draft after every denoising step on a terminal (committed canvases plain, the current canvas
dimmed, with its canvas and step numbers), and printing reasoning apart from the answer.
On a stream that is not a terminal only the final answers are printed.
Must not: implement generation or templates itself; it calls `Model.chat` with an `on_step` callback.
"""

from __future__ import annotations

import shutil
from typing import TextIO

from ..api import Model
from ..engine.generate import StepEvent
from ..engine.prefix import PrefixCache

DIM, PLAIN, CLEAR_BELOW = "\x1b[2m", "\x1b[0m", "\x1b[J"
PROMPT = "model> "


def layout_rows(text: str, width: int, column: int) -> int:
    """Rows the cursor moves down while `text` is written from `column` on a terminal `width` columns wide (lines
    wrap at the width; one column per character)."""
    rows = 0
    for ch in text:
        if ch == "\n":
            rows, column = rows + 1, 0
            continue
        if column >= width:
            rows, column = rows + 1, 0
        column += 1
    return rows


class _DraftView:
    """Redraws one answer in place: the committed canvases, then the current canvas's draft. Each redraw goes back up
    the rows the last one took and clears below; a draft taller than the terminal shows its last lines, so the
    place it started never scrolls away."""

    def __init__(self, model: Model, out: TextIO):
        self.tok, self.out = model.tokenizer, out
        self.eos = set(model.config.eos_token_ids)
        self.committed: list[int] = []
        self.canvas, self.last = 0, []
        self.rows = 0  # rows below the prompt's line that the last redraw took

    def _until_eos(self, ids: list[int]) -> list[int]:
        return next((ids[:i] for i, t in enumerate(ids) if t in self.eos), ids)

    def _back(self) -> str:
        """Escape codes that return to just after the prompt and clear everything drawn since."""
        up = f"\x1b[{self.rows}A" if self.rows else ""
        return f"\r{up}\x1b[{len(PROMPT)}C{CLEAR_BELOW}"

    def step(self, event: StepEvent) -> None:
        if event.canvas_index != self.canvas:
            self.committed += self._until_eos(self.last)
            self.canvas = event.canvas_index
        self.last = event.draft[0].tolist()
        done = self.tok.decode(self.committed)
        draft = self.tok.decode(self._until_eos(self.last))
        status = f"  [canvas {event.canvas_index + 1}, step {event.step}]"
        width, height = shutil.get_terminal_size()
        while layout_rows(done + draft + status, width, len(PROMPT)) > height - 2 and (done or draft):
            done, draft = (done[1:], draft) if done else (done, draft[1:])  # the start scrolls out of view
        back = self._back()
        self.rows = layout_rows(done + draft + status, width, len(PROMPT))
        self.out.write(f"{back}{done}{DIM}{draft}{status}{PLAIN}")
        self.out.flush()

    def clear(self) -> None:
        self.out.write(self._back())
        self.rows = 0


def chat(model: Model, stdin: TextIO, stdout: TextIO, *, thinking: bool = False, **settings) -> int:
    """Run the conversation loop until /exit (or /quit), end of input or Ctrl-C at the prompt; `settings` go to
    `Model.chat` (None = default). A turn that fails (a conversation past the context, say) or is interrupted with
    Ctrl-C is dropped with a message, and the conversation goes on."""
    tok = model.tokenizer
    if tok is None or tok.chat_template is None:
        raise ValueError("dgemma chat needs a checkpoint with a tokenizer and a chat template")
    live = stdout.isatty()
    history: list[dict] = []
    prefix = PrefixCache(capacity=2)  # each turn's prompt extends the last one: only the new turn is encoded
    stdout.write("dgemma chat: /reset forgets the conversation, /exit or Ctrl-D ends it\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            stdout.write("\n")
            return 0
        line = line.strip()
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            stdout.write("(conversation cleared)\n")
            continue
        if not line:
            continue
        stdout.write(PROMPT)
        view = _DraftView(model, stdout) if live else None
        try:
            out = model.chat([*history, {"role": "user", "content": line}], thinking=thinking,
                             on_step=view.step if view else None, prefix_cache=prefix, **settings)
        except (ValueError, KeyboardInterrupt) as err:
            if view:
                view.clear()
            why = "interrupted" if isinstance(err, KeyboardInterrupt) else str(err)
            stdout.write(f"({why}; this turn is dropped: /reset starts afresh)\n")
            continue
        if view:
            view.clear()
        reasoning, text = out.reasoning[0] if out.reasoning else "", out.text[0]
        if reasoning:
            stdout.write(f"{DIM if live else ''}(thinking) {reasoning}{PLAIN if live else ''}\n       ")
        stdout.write(f"{text}\n")
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": text}]
