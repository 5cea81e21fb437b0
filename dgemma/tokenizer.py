"""Tokenizer: text <-> token ids and chat-template rendering for a checkpoint directory.

Contract
- Owns: loading ``tokenizer.json`` (via the ``tokenizers`` library), the chat template
  (``chat_template.jinja`` or ``tokenizer_config.json["chat_template"]``) and the special-token
  ids (bos / eos / pad) gathered from ``tokenizer_config.json``, ``config.json`` and
  ``generation_config.json``; encoding, decoding and rendering chat messages to a prompt string.
- Must not: touch the network, unpickle anything, run remote code, or know about the model,
  sampling or devices. Ids are plain ``list[int]``; tensors are only accepted as decode input.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

# Special tokens of the byte-level tokenizer, at the ids the model config expects (pad 0, eos 1, bos 2).
BYTE_SPECIALS = ("<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>")
# The assistant's turns are the model's, as in Gemma's own template: a conversation renders its earlier answers the
# way its generation prompt begins them, so each turn's prompt extends the previous one token for token.
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def _read_json(path: Path) -> dict:
    """Parsed JSON object at ``path``; ``{}`` if the file is missing; ValueError naming it if malformed."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed JSON in {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"malformed JSON in {path}: expected an object")
    return data


def _as_ids(value: Any) -> list[int]:
    """An ``int`` / list of ints / None from a config -> list of ints."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _raise_exception(msg: str) -> None:
    raise ValueError(msg)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _validate_messages(messages: Any) -> None:
    """Raise ValueError unless ``messages`` is a non-empty list of {"role": str, "content": str | parts}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] is not a dict")
        if "role" not in m:
            raise ValueError(f"messages[{i}] has no 'role'")
        if not isinstance(m["role"], str):
            raise ValueError(f"messages[{i}]['role'] is not a string")
        if "content" not in m:
            raise ValueError(f"messages[{i}] has no 'content'")
        content = m["content"]
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"messages[{i}]['content'][{j}] is not a {{'type': 'text', 'text': str}} part")
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a string or a list of text parts")


class Tokenizer:
    """Text <-> ids for a checkpoint directory: tokenizer.json via the `tokenizers` library, plus the chat template.

    Attributes: ``bos_token_id: int | None``, ``eos_token_ids: list[int]`` (de-duplicated, in order),
    ``pad_token_id: int | None``, ``chat_template: str | None``.
    """

    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None = None, special: dict | None = None):
        """``special`` may hold ``bos_token_id`` (int | None), ``eos_token_ids`` (list[int]), ``pad_token_id`` (int | None)."""
        special = special or {}
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token_id: int | None = special.get("bos_token_id")
        self.eos_token_ids: list[int] = list(dict.fromkeys(special.get("eos_token_ids") or []))
        self.pad_token_id: int | None = special.get("pad_token_id")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """Load from a checkpoint directory; None when it has no ``tokenizer.json``."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        tok_cfg = _read_json(path / "tokenizer_config.json")
        cfg = _read_json(path / "config.json")
        gen_cfg = _read_json(path / "generation_config.json")
        text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}

        def from_tok_cfg(key: str) -> int | None:
            tok = tok_cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return backend.token_to_id(tok) if isinstance(tok, str) else None

        def from_cfg(key: str) -> Any:
            return text_cfg.get(key, cfg.get(key))

        bos = from_tok_cfg("bos_token")
        pad = from_tok_cfg("pad_token")
        eos_ids = _as_ids(from_tok_cfg("eos_token")) + _as_ids(from_cfg("eos_token_id")) + _as_ids(gen_cfg.get("eos_token_id"))
        special = {
            "bos_token_id": bos if bos is not None else next(iter(_as_ids(from_cfg("bos_token_id"))), None),
            "eos_token_ids": eos_ids,
            "pad_token_id": pad if pad is not None else next(iter(_as_ids(from_cfg("pad_token_id"))), None),
        }

        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            template = tok_cfg.get("chat_template")
            if isinstance(template, list):
                template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
            if not isinstance(template, str):
                template = None
        return cls(backend, template, special)

    @staticmethod
    def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], special: list[str],
                       added: list[str] = ()) -> tokenizers.Tokenizer:
        """A GPT-2 style byte-level BPE backend: `vocab` token -> id, `merges` in rank order, `special` tokens
        (matched whole in text, skipped when decoding) and other `added` ones, all already in `vocab`."""
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(list(special))
        backend.add_tokens(list(added))
        return backend

    @staticmethod
    def sentencepiece_bpe(pieces: list[str], scores: list[float], special: list[str], added: list[str] = (),
                          fallback: list[str] = (), unk: str | None = None,
                          add_space_prefix: bool = False) -> tokenizers.Tokenizer:
        """A SentencePiece BPE backend from its pieces (by id) and scores: spaces become "▁" (after one is
        prepended with `add_space_prefix`), and adjacent pieces merge, the highest-scoring result first (the leftmost
        among equals), into any piece of the vocabulary; characters with no piece fall back to the `<0xXX>` byte
        pieces. The merges are every split of every ordinary piece into two ordinary pieces, ranked by the whole
        piece's score. `special` pieces are matched whole and skipped when decoding, `added` ones matched whole;
        neither, nor the byte pieces in `fallback`, takes part in merges."""
        vocab = {p: i for i, p in enumerate(pieces)}
        apart = set(special) | set(added) | set(fallback)
        ranked = sorted((-score, vocab[piece[:cut]], vocab[piece[cut:]])
                        for piece, score in zip(pieces, scores) if piece not in apart
                        for cut in range(1, len(piece))
                        if piece[:cut] in vocab and piece[cut:] in vocab and not {piece[:cut], piece[cut:]} & apart)
        merges = [(pieces[left], pieces[right]) for _, left, right in ranked]
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True,
                                                  fuse_unk=True))
        prefix = [normalizers.Prepend(" ")] if add_space_prefix else []
        backend.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
        strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                            + strip)
        backend.add_special_tokens(list(special))
        backend.add_tokens([tokenizers.AddedToken(t, normalized=False) for t in added])  # matched in the raw text
        return backend

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """A tokenizer with one id per byte (261 ids: the specials above, then 256 bytes): any text, no training."""
        vocab = {t: i for i, t in enumerate(BYTE_SPECIALS)}
        for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab[ch] = len(vocab)
        backend = cls.byte_level_bpe(vocab, [], BYTE_SPECIALS)
        return cls(backend, BYTE_CHAT_TEMPLATE, {"bos_token_id": 2, "eos_token_ids": [1], "pad_token_id": 0})

    def check_fits(self, vocab_size: int, source) -> Tokenizer:
        """self, or ValueError naming `source` when it has more ids than a model's `vocab_size`."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"tokenizer {source} has {self.vocab_size} token ids; the model has {vocab_size}")
        return self

    @classmethod
    def train_bpe(cls, texts, vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE on an iterable of strings: the byte-level specials and chat template, then the
        256 bytes, then merges up to `vocab_size` ids."""
        if vocab_size < len(BYTE_SPECIALS) + 256:
            raise ValueError(f"a byte-level BPE needs vocab_size >= {len(BYTE_SPECIALS) + 256}, got {vocab_size}")
        backend = cls.byte_level_bpe({}, [], [])  # empty, for the trainer to fill
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(BYTE_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, BYTE_CHAT_TEMPLATE, {"bos_token_id": 2, "eos_token_ids": [1], "pad_token_id": 0})

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and (if any) chat_template.jinja into directory `path`."""
        path = Path(path)
        self.backend.save(str(path / "tokenizer.json"))
        config = {
            "bos_token": self._token_str(self.bos_token_id) or None,
            "eos_token": self._token_str(self.eos_token_ids[0] if self.eos_token_ids else None) or None,
            "pad_token": self._token_str(self.pad_token_id) or None,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        if self.chat_template is not None:
            (path / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        """Number of ids the backend knows, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """``text`` -> ids; special tokens are never added except a leading bos when ``add_bos``. ValueError for text
        that is not a string of Unicode characters (lone surrogates: bytes that were not UTF-8)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"the text is not valid Unicode at character {err.start} (input that was not UTF-8?)") \
                from None
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True but this tokenizer has no bos token")
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """``ids`` (list[int] or 1-D tensor) -> text, dropping special tokens by default."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def line_starts(self, size: int | None = None) -> list[bool]:
        """Per id (padded with False to `size`): whether its text begins with a newline, i.e. it starts a line."""
        flags = [self.decode([i]).startswith("\n") for i in range(self.vocab_size)]
        return flags + [False] * ((size or 0) - len(flags))

    def _token_str(self, token_id: int | None) -> str:
        return (self.backend.id_to_token(token_id) or "") if token_id is not None else ""

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, thinking: bool = False, **extra: Any
    ) -> str:
        """Render ``messages`` with the checkpoint's chat template (sandboxed Jinja) to a prompt string."""
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template; use complete() or pass token ids")
        _validate_messages(messages)
        # Text parts are joined into one string, and "developer" (OpenAI's newer name for it) is "system" for a
        # template that does not know it.
        developer = "developer" if "developer" in self.chat_template else "system"
        messages = [{**m, "role": developer if m["role"] == "developer" else m["role"],
                     "content": m["content"] if isinstance(m["content"], str)
                     else "".join(part["text"] for part in m["content"])} for m in messages]
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])  # {% break %}, as transformers
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=thinking,
                bos_token=self._token_str(self.bos_token_id),
                eos_token=self._token_str(self.eos_token_ids[0] if self.eos_token_ids else None),
                **extra,
            )
        except TemplateError as err:
            raise ValueError(f"the chat template failed: {type(err).__name__}: {err}") from None

    def encode_chat(self, messages: list[dict], *, thinking: bool = False, **extra: Any) -> list[int]:
        """Render with a generation prompt, then encode; the template emits bos itself, so none is added."""
        return self.encode(self.apply_chat_template(messages, thinking=thinking, **extra), add_bos=False)
