"""Tests for dgemma.tokenizer on a tiny BPE tokenizer built in the test (no network)."""
import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from dgemma.tokenizer import Tokenizer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% if not enable_thinking %}<|channel>thought\n<channel|>{% endif %}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests",
    "user model thought channel turn",
    "Diffusion models denoise many tokens in parallel.",
] * 4


def _backend() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _write_ckpt(path, *, template_file=True, tok_cfg_extra=None):
    _backend().save(str(path / "tokenizer.json"))
    cfg = {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "pad_token": "<pad>", **(tok_cfg_extra or {})}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if template_file:
        (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture
def tok(tmp_path):
    t = Tokenizer.from_dir(_write_ckpt(tmp_path))
    assert t is not None
    return t


def test_round_trip(tok):
    text = "hello world, the quick brown fox!"
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.encode(text, add_bos=True) == [tok.bos_token_id] + ids
    assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True)


def test_special_ids_and_decode_drops_specials(tok):
    b = tok.backend
    assert tok.bos_token_id == b.token_to_id("<bos>")
    assert tok.eos_token_ids == [b.token_to_id("<eos>")]
    assert tok.pad_token_id == b.token_to_id("<pad>")
    ids = [tok.bos_token_id] + tok.encode("hello world") + tok.eos_token_ids
    assert tok.decode(ids) == "hello world"
    assert "<bos>" in tok.decode(ids, skip_special_tokens=False)


def test_eos_merged_from_configs(tmp_path):
    _write_ckpt(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": [1, 7], "bos_token_id": 99}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 8}))
    t = Tokenizer.from_dir(tmp_path)
    assert t.eos_token_ids == [1, 7, 8]  # "<eos>" is id 1; duplicates dropped
    assert t.bos_token_id == t.backend.token_to_id("<bos>")  # tokenizer_config wins


def test_chat_template_thinking(tok):
    msgs = [{"role": "user", "content": "hello world"}]
    plain = tok.apply_chat_template(msgs)
    thinking = tok.apply_chat_template(msgs, thinking=True)
    assert plain == "<bos><|turn>user\nhello world<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert thinking == "<bos><|turn>user\nhello world<turn|>\n<|turn>model\n"
    ids = tok.encode_chat(msgs)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=False) == plain
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert tok.apply_chat_template(parts).startswith("<bos><|turn>user\n")


def test_list_form_template(tmp_path):
    cfg = {"chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": TEMPLATE}]}
    t = Tokenizer.from_dir(_write_ckpt(tmp_path, template_file=False, tok_cfg_extra=cfg))
    assert t.chat_template == TEMPLATE
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<bos><|turn>user\nhi<turn|>")


def test_empty_dir_returns_none(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None


def test_malformed_config_names_file(tmp_path):
    _write_ckpt(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "messages, match",
    [([], "non-empty"), ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] has no 'role'"),
     ([{"role": "user"}], "no 'content'"), ([{"role": "user", "content": 3}], "content")],
)
def test_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_raise_exception_global(tmp_path):
    _write_ckpt(tmp_path, template_file=False)
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('nope') }}")
    with pytest.raises(ValueError, match="nope"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_no_template(tmp_path):
    t = Tokenizer.from_dir(_write_ckpt(tmp_path, template_file=False))
    assert t.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        t.encode_chat([{"role": "user", "content": "x"}])


def test_text_parts_developer_role_loop_controls_and_template_errors(tok, tmp_path):
    plain = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi you"}])
    parts = tok.apply_chat_template([{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                                     {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                                  {"type": "text", "text": " you"}]}])
    assert parts == plain  # parts joined; "developer" is "system" for a template that does not name it
    _write_ckpt(tmp_path, template_file=False)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% break %}{% endfor %}")
    looping = Tokenizer.from_dir(tmp_path)
    assert looping.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[5]['content'] }}")
    with pytest.raises(ValueError, match="the chat template failed: UndefinedError"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_text_that_is_not_unicode_is_a_value_error(tok):
    with pytest.raises(ValueError, match="not valid Unicode at character 3"):
        tok.encode("caf\udce9")  # how Python passes the byte 0xe9 of a Latin-1 terminal through
    with pytest.raises(ValueError, match="text must be a string"):
        tok.encode(b"bytes")
