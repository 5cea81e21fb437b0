"""Streamed detokenization (stop strings, partial characters, reasoning channel), thinking in the chat route, and
the terminal chat."""

from __future__ import annotations

import io

import pytest

from dgemma.api import Model
from dgemma.serve.chat import chat
from dgemma.serve.text import Choice, TextStream, channel_ids
from dgemma.tokenizer import BYTE_CHAT_TEMPLATE, Tokenizer

THINKING_TEMPLATE = "{% if enable_thinking %}<|turn>system\n<|think|><turn|>\n{% endif %}" + BYTE_CHAT_TEMPLATE


def thinking_tokenizer() -> Tokenizer:
    """The byte-level tokenizer plus channel marker tokens and a template with a thinking switch."""
    tok = Tokenizer.byte_level()
    tok.backend.add_special_tokens(["<|channel>", "<channel|>"])
    tok.chat_template = THINKING_TEMPLATE
    return tok


def deltas(stream, pieces, final_last=True):
    return [stream.feed(p, final_last and i == len(pieces) - 1) for i, p in enumerate(pieces)]


def test_text_is_released_once_settled_and_cut_at_stop_strings():
    tok = Tokenizer.byte_level()
    ids = tok.encode("héllo END world")
    # 'é' is two bytes: split between them, the first delta must hold it back
    s = TextStream(tok)
    out = deltas(s, [ids[:2], ids[2:]])
    assert out == ["h", "éllo END world"] and s.used == len(ids)
    s = TextStream(tok, stops=("END",))
    out = deltas(s, [ids[:9], ids[9:]])  # "héllo E" then "ND world": "E" may start the stop string
    assert out == ["héllo ", ""] and s.text == "héllo " and s.stopped
    assert s.used == len(tok.encode("héllo END"))
    s = TextStream(tok, stops=("xyz",))
    assert "".join(deltas(s, [ids[:5], ids[5:10], ids[10:]])) == "héllo END world" and not s.stopped


def test_reasoning_channel_is_split_from_the_answer():
    tok = thinking_tokenizer()
    open_id, close_id = channel_ids(tok)
    ids = [open_id, *tok.encode("thought\nadd them"), close_id, *tok.encode("It is 3.")]
    whole = Choice(tok, channel=(open_id, close_id))
    assert whole.feed(ids, True) == ("add them", "It is 3.") and whole.tokens == len(ids)
    parts = Choice(tok, channel=(open_id, close_id))
    pieces = [parts.feed(ids[i:i + 3], i + 3 >= len(ids)) for i in range(0, len(ids), 3)]
    assert "".join(p[0] for p in pieces) == "add them" and "".join(p[1] for p in pieces) == "It is 3."
    assert channel_ids(Tokenizer.byte_level()) is None


def test_thinking_request_returns_reasoning_content(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from test_serve import tiny_checkpoint

    from dgemma.serve.app import ServeConfig, create_app

    base = tiny_checkpoint(tmp_path / "tiny")
    model = Model(base.net, base.settings, thinking_tokenizer(), base.path)
    with TestClient(create_app(model, ServeConfig(model_name="tiny"))) as tc:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "1+2?"}], "max_tokens": 8, "seed": 0}
        on = tc.post("/v1/chat/completions", json={**body, "thinking": True}).json()
        off = tc.post("/v1/chat/completions", json=body).json()
    assert isinstance(on["choices"][0]["message"]["reasoning_content"], str)
    assert on["usage"]["prompt_tokens"] > off["usage"]["prompt_tokens"]  # the template's thinking turn


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_chat_redraws_the_draft_and_answers(tmp_path):
    from test_serve import tiny_checkpoint

    model = tiny_checkpoint(tmp_path / "tiny")
    out = _Terminal()
    assert chat(model, io.StringIO("hello\n/reset\nagain\n"), out, max_new_tokens=40, max_denoising_steps=2,
                seed=1) == 0
    text = out.getvalue()
    assert text.count("model> ") == 2 and "(conversation cleared)" in text
    assert text.count("[canvas 1, step 1]") == 2 and text.count("[canvas 1, step 2]") == 2  # redrawn every step
    plain = io.StringIO()
    assert chat(model, io.StringIO("hello\n"), plain, max_new_tokens=40, max_denoising_steps=2, seed=1) == 0
    answer = model.chat([{"role": "user", "content": "hello"}], max_new_tokens=40, max_denoising_steps=2, seed=1)
    assert plain.getvalue().endswith(f"model> {answer.text[0]}\nyou> \n") and "\x1b" not in plain.getvalue()


def test_chat_command_needs_a_template(tmp_path):
    from test_serve import tiny_checkpoint

    model = tiny_checkpoint(tmp_path / "tiny")
    model.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        chat(model, io.StringIO(""), io.StringIO())


def test_dgemma_chat_command(tmp_path, monkeypatch, capsys):
    from test_serve import tiny_checkpoint

    from dgemma.cli import main

    path = tmp_path / "tiny"
    tiny_checkpoint(path)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\n"))
    assert main(["chat", "--model", str(path), "--max-new-tokens", "8", "--steps", "1", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("you> ") == 2 and out.count("model> ") == 1


def test_terminal_chat_second_turn_reuses_the_first(tmp_path, monkeypatch):
    """Turn two's prompt extends turn one's: only the new tokens are encoded, and the answer is unchanged."""
    from test_serve import tiny_checkpoint

    from dgemma.serve import chat as chat_module

    caches = []

    class Recorded(chat_module.PrefixCache):
        def __init__(self, capacity):
            super().__init__(capacity)
            caches.append(self)
    monkeypatch.setattr(chat_module, "PrefixCache", Recorded)
    model = tiny_checkpoint(tmp_path / "tiny")
    kw = dict(max_new_tokens=24, max_denoising_steps=2, seed=1)
    out = io.StringIO()
    assert chat(model, io.StringIO("hello\nagain\n"), out, **kw) == 0
    first = [{"role": "user", "content": "hello"}]
    answer = model.chat(first, **kw).text[0]
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "again"}]
    assert out.getvalue().endswith(f"model> {model.chat(second, **kw).text[0]}\nyou> \n")
    assert caches[0].hits == 1 and caches[0].reused_tokens == len(model.tokenizer.encode_chat(first))


def test_model_chat_separates_the_reasoning_channel(tmp_path):
    from test_serve import tiny_checkpoint

    from dgemma.engine.generate import GenerationResult

    base = tiny_checkpoint(tmp_path / "tiny")
    tok = thinking_tokenizer()
    model = Model(base.net, base.settings, tok, base.path)
    open_id, close_id = channel_ids(tok)
    ids = [open_id, *tok.encode("thought\nadd them"), close_id, *tok.encode("It is 3.")]
    model.generate = lambda *a, **kw: GenerationResult([ids], [1.0], [[1]], ["stop"])
    out = model.chat([{"role": "user", "content": "1+2?"}], thinking=True)
    assert out.text == ["It is 3."] and out.reasoning == ["add them"]


def test_a_failed_or_interrupted_turn_is_dropped_and_the_chat_goes_on(tmp_path, monkeypatch):
    from test_serve import tiny_checkpoint

    model = tiny_checkpoint(tmp_path / "tiny")
    out = io.StringIO()
    long = "word " * 2000  # past the model's 4096 positions
    assert chat(model, io.StringIO(f"{long}\nhello\n/quit\nnever read\n"), out, max_new_tokens=16,
                max_denoising_steps=2, seed=1) == 0
    text = out.getvalue()
    answer = model.chat([{"role": "user", "content": "hello"}], max_new_tokens=16, max_denoising_steps=2, seed=1)
    assert "exceeds the context of 4096 positions; this turn is dropped" in text
    assert text.endswith(f"model> {answer.text[0]}\nyou> ")  # the second turn did not see the first
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    real = model.chat
    monkeypatch.setattr(model, "chat", interrupted)
    out = io.StringIO()
    assert chat(model, io.StringIO("hello\nhello\n"), out, max_new_tokens=16, max_denoising_steps=2, seed=1) == 0
    assert "(interrupted; this turn is dropped" in out.getvalue() and out.getvalue().count(answer.text[0]) == 1


def test_the_draft_redraw_returns_to_where_it_began_on_a_small_terminal(tmp_path, monkeypatch):
    """Each redraw moves up exactly the rows the previous one took, and never more than the terminal holds."""
    import os
    import re

    from test_serve import tiny_checkpoint

    from dgemma.serve import chat as chat_module

    assert chat_module.layout_rows("abcdef", 4, 2) == 1 and chat_module.layout_rows("ab\ncd", 10, 0) == 1
    assert chat_module.layout_rows("abcd", 4, 0) == 0  # the cursor waits at the last column
    monkeypatch.setattr(chat_module.shutil, "get_terminal_size", lambda: os.terminal_size((20, 6)))
    model = tiny_checkpoint(tmp_path / "tiny")
    out = _Terminal()
    assert chat(model, io.StringIO("hello\n"), out, max_new_tokens=96, max_denoising_steps=2, seed=1) == 0
    frames = out.getvalue().split("\r")[1:]  # each redraw starts with a carriage return
    ups = [int(m.group(1)) if (m := re.match(r"\x1b\[(\d+)A", f)) else 0 for f in frames]
    assert len(frames) > 3 and max(ups) <= 6 - 2
    for frame, up in zip(frames[:-1], ups[1:]):  # the next redraw climbs what this one drew
        body = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", frame)
        assert chat_module.layout_rows(body, 20, len(chat_module.PROMPT)) == up

