"""Incremental detokenization for streamed answers: stop strings, partial characters, the reasoning channel.

Owns: turning the ids a choice receives canvas by canvas into text deltas that never change once sent (a trailing
partial UTF-8 character, a possible beginning of a stop string and an unfinished channel label are held back until
they are settled or the choice ends), cutting at the earliest stop string and counting the tokens used up to it, and
routing ids between a reasoning channel and the answer when the tokenizer has channel marker tokens.
Must not: know about HTTP, queues or the engine.
"""

from __future__ import annotations

from ..tokenizer import Tokenizer

# Gemma 4 writes its thoughts as `<|channel>thought\n ... <channel|>` before the answer.
CHANNEL_OPEN, CHANNEL_CLOSE, CHANNEL_LABEL = "<|channel>", "<channel|>", "thought\n"


def channel_ids(tok: Tokenizer) -> tuple[int, int] | None:
    """The (open, close) ids of the reasoning channel markers, or None when the vocabulary lacks them."""
    open_id, close_id = tok.backend.token_to_id(CHANNEL_OPEN), tok.backend.token_to_id(CHANNEL_CLOSE)
    return None if open_id is None or close_id is None else (open_id, close_id)


class TextStream:
    """One stream of ids -> text released in deltas. `stops`: strings that end the stream (not included);
    `label`: a leading string to drop (the channel's role label)."""

    def __init__(self, tok: Tokenizer, stops: tuple[str, ...] = (), label: str = ""):
        self.tok, self.stops, self.label = tok, stops, label
        self.ids: list[int] = []
        self.text = ""  # released so far
        self.stopped = False
        self.used = 0  # ids consumed: all of them, or those up to the end of the stop string

    def feed(self, ids: list[int], final: bool) -> str:
        """Add ids; return the newly released text (everything left when `final` or a stop string is found)."""
        if self.stopped:
            return ""
        before = len(self.ids)
        self.ids += ids
        text = self._strip_label(self.tok.decode(self.ids), final)
        cut = self._find_stop(text)
        if cut is not None:
            text, final, self.stopped = text[:cut], True, True
            self.used = self._used_through_stop(before)
        else:
            self.used = len(self.ids)
        end = len(text) if final else self._settled_end(text)
        delta = text[len(self.text):end] if end > len(self.text) else ""
        self.text += delta
        return delta

    def _strip_label(self, text: str, final: bool) -> str:
        if not self.label:
            return text
        if text.startswith(self.label):
            return text[len(self.label):]
        return "" if self.label.startswith(text) and not final else text

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, max(0, len(self.text) - len(s))) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _used_through_stop(self, before: int) -> int:
        for k in range(before + 1, len(self.ids) + 1):
            if self._find_stop(self._strip_label(self.tok.decode(self.ids[:k]), True)) is not None:
                return k
        return len(self.ids)

    def _settled_end(self, text: str) -> int:
        """Length of the prefix of `text` that later ids cannot change."""
        end = len(text.rstrip("\ufffd"))  # a multi-byte character may still be arriving
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, end), hold, -1):
                if text[end - k:end] == stop[:k]:
                    hold = k
                    break
        return end - hold


class Choice:
    """The text of one answer: ids routed to `reasoning` (inside the channel markers) or `content`."""

    def __init__(self, tok: Tokenizer, stops: tuple[str, ...] = (), channel: tuple[int, int] | None = None):
        self.channel = channel
        self.content = TextStream(tok, stops)
        self.reasoning = TextStream(tok, label=CHANNEL_LABEL) if channel else None
        self.in_channel = False
        self.markers = 0
        self.finish_reason: str | None = None
        self.steps: list[int] = []  # denoising steps per canvas

    @property
    def stopped(self) -> bool:
        return self.content.stopped

    @property
    def tokens(self) -> int:
        """Completion tokens: reasoning, markers and answer up to a stop string."""
        return self.markers + (len(self.reasoning.ids) if self.reasoning else 0) + self.content.used

    def feed(self, ids: list[int], final: bool) -> tuple[str, str]:
        """Add ids; return (reasoning delta, content delta)."""
        if self.stopped:
            return "", ""
        thought, answer = "", ""
        part: list[int] = []
        for t in ids:
            if self.channel and t in self.channel:
                opening = t == self.channel[0]
                if opening != self.in_channel:
                    if self.in_channel:
                        thought += self.reasoning.feed(part, True)
                    else:
                        answer += self.content.feed(part, False)
                    part, self.in_channel = [], opening
                self.markers += 1
                continue
            part.append(t)
        if self.in_channel:
            thought += self.reasoning.feed(part, final)
        else:
            answer += self.content.feed(part, final)
        if final and self.reasoning is not None and self.in_channel:
            answer += self.content.feed([], True)
        return thought, answer
