"""Tokenizer and chat template, from an HF directory or from a GGUF file's metadata.

Token ids come from the `tokenizers` library (the Rust BPE transformers uses). For a GGUF file
the `tokenizers.Tokenizer` is rebuilt from the stored vocabulary, merges and token types the way
transformers rebuilds it, so both give the same ids. Chat templates are rendered in jinja2's
sandbox with transformers' helpers, then encoded without adding special tokens again (the
template writes them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from models.errors import ModelLoadError

logger = logging.getLogger(__name__)

# End-of-turn markers of common chat formats; stop tokens when the vocabulary has them as
# special tokens.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                      "<|endoftext|>")
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# llama.cpp token types (tokenizer.ggml.token_type).
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> split regex applied before the byte-level mapping. Types not listed use
# GPT-2's own regex, as transformers does (that includes SmolLM's "smollm").
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's split: as Llama 3's, but digits one at a time.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_GPT2_REGEX_PRE_TYPES = ("default", "gpt2", "gpt-2", "smollm")


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest map past U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@lru_cache(maxsize=32)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        here it only renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat formats do not want.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template that go with it.

    Special tokens are held as strings (what templates see) and resolved to ids once; a token the
    vocabulary lacks resolves to None. `stop_token_ids` = eos, end-of-turn specials, and any
    extra ids the checkpoint names (GGUF eot/eom, generation_config.json eos).
    """

    def __init__(
        self,
        backend,
        chat_template: str | None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        extra_stop_token_ids: Iterable[int] = (),
        source: str = "",
    ) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.chat_template = chat_template
        self.source = source  # the file(s) it came from, for error messages
        tokens = (bos_token, eos_token, unk_token, pad_token)
        self.special_tokens = {  # what chat templates see, e.g. {{ bos_token }}
            name: token for name, token in zip(_SPECIAL_TOKEN_NAMES, tokens, strict=True) if token
        }
        self.bos_token_id: int | None = self._token_id(bos_token)
        self.eos_token_id: int | None = self._token_id(eos_token)
        self.pad_token_id: int | None = self._token_id(pad_token)
        special_to_id = {
            added.content: token_id
            for token_id, added in backend.get_added_tokens_decoder().items()
            if added.special
        }
        stops = {special_to_id[t] for t in END_OF_TURN_TOKENS if t in special_to_id}
        stops.update(int(t) for t in extra_stop_token_ids)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        self.stop_token_ids: frozenset[int] = frozenset(stops)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """An HF tokenizer directory: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(
                f"{tokenizer_file}: missing; copy the model's tokenizer.json (and "
                "tokenizer_config.json) into the directory"
            )
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ModelLoadError(
                f"{tokenizer_file}: cannot be read ({str(exc).splitlines()[0]}); re-download the "
                "model's tokenizer.json"
            ) from None
        config = _read_json(path / "tokenizer_config.json")
        template_file = path / "chat_template.jinja"
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template_file.is_file():  # transformers >= 4.48 saves it here, and prefers it
            template = template_file.read_text()

        def token(name: str) -> str | None:
            value = config.get(name)
            return value.get("content") if isinstance(value, dict) else value

        eos_ids = _read_json(path / "generation_config.json").get("eos_token_id")
        return cls(
            backend,
            template,
            **{name: token(name) for name in _SPECIAL_TOKEN_NAMES},
            extra_stop_token_ids=[eos_ids] if isinstance(eos_ids, int) else eos_ids or (),
            source=str(path),
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer a GGUF file's metadata describes: byte-level BPE ("gpt2") or
        SentencePiece BPE ("llama": Gemma, Llama 2, Mistral)."""
        from tokenizers import AddedToken, processors

        from models.gguf import read_gguf_metadata

        path = Path(path)
        meta = read_gguf_metadata(path)
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ModelLoadError(
                f"{path}: GGUF tokenizer type {kind!r} is not supported (byte-level BPE 'gpt2' "
                "and SentencePiece 'llama' are); load the model from an HF directory with "
                "tokenizer.json instead"
            )
        if "tokenizer.ggml.tokens" not in meta or (kind == "gpt2" and "tokenizer.ggml.merges" not in meta):
            raise ModelLoadError(
                f"{path}: the GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges; "
                "re-convert the model with a current llama.cpp"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(token_types) != len(tokens):
            raise ModelLoadError(
                f"{path}: tokenizer.ggml.token_type has {len(token_types)} entries for "
                f"{len(tokens)} tokens; re-convert the model with a current llama.cpp"
            )
        if kind == "gpt2":
            backend, vocab, is_whole = _byte_level_backend(meta, tokens, path)
        else:
            if "tokenizer.ggml.scores" not in meta and "tokenizer.ggml.merges" not in meta:
                raise ModelLoadError(
                    f"{path}: a SentencePiece GGUF tokenizer needs tokenizer.ggml.scores or "
                    "tokenizer.ggml.merges; re-convert the model with a current llama.cpp"
                )
            backend, vocab = _sentencepiece_backend(meta, tokens, meta.get("general.architecture"))
            is_whole = None

        # Control tokens (<|im_start|>, <end_of_turn>) must stay whole, so they become special
        # added tokens; in a byte-level vocabulary one spelled outside the byte alphabet is a
        # converter mislabel and is skipped, as transformers does. User-defined ones (<think>,
        # Gemma's runs of tabs) are added but not special, if the vocabulary spells them so,
        # except end-of-turn markers: some converters type <end_of_turn> user-defined, and
        # llama.cpp makes it a control (stop) token by its text, as done here; so is a token
        # the file names as end of turn or message, whatever its type.
        extra_stops = [
            meta[key] for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if isinstance(meta.get(key), int) and 0 <= meta[key] < len(tokens)
        ]
        named_ends = {tokens[i] for i in extra_stops}

        def is_control(token: str, token_type: int) -> bool:
            return token_type == GGUF_CONTROL or token in named_ends or (
                token_type == GGUF_USER_DEFINED and token in END_OF_TURN_TOKENS)

        controls = {
            token for token, token_type in zip(tokens, token_types, strict=True)
            if is_control(token, token_type) and (is_whole is None or is_whole(token))
        }
        backend.add_special_tokens([
            AddedToken(token, special=True, normalized=False)
            for token in tokens if token in controls
        ])
        known = backend.get_vocab(with_added_tokens=True)
        backend.add_tokens([
            AddedToken(token, special=False, normalized=False)
            for token, token_type in zip(tokens, token_types, strict=True)
            if token_type == GGUF_USER_DEFINED and token in known and token not in controls
        ])

        def token_at(key: str) -> str | None:
            token_id = meta.get(key)
            return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None

        bos, eos = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
        # A SentencePiece file without the flag gets BOS, as llama.cpp and transformers do.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        single = [bos] * add_bos + ["$A"] + [eos] * add_eos
        backend.post_processor = processors.TemplateProcessing(
            single=single,
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(single) if t != "$A"],
        )
        template = meta.get("tokenizer.chat_template")
        if template is None and meta.get("general.architecture") in GEMMA_ARCHITECTURES:
            # Gemma base-model files often carry none (transformers then has none either), while
            # Google's releases, base models included, ship this turn format.
            logger.info("%s: no tokenizer.chat_template; using Gemma's turn format", path)
            template = GEMMA_CHAT_TEMPLATE
        return cls(
            backend,
            template,
            bos_token=bos,
            eos_token=eos,
            unk_token=token_at("tokenizer.ggml.unknown_token_id"),
            pad_token=token_at("tokenizer.ggml.padding_token_id"),
            extra_stop_token_ids=extra_stops,
            source=str(path),
        )

    # -- use -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ModelLoadError(
                f"{self.source}: the tokenizer has no chat template; add one (chat_template in "
                "tokenizer_config.json, or chat_template.jinja) or pass plain prompts"
            )
        from jinja2.exceptions import TemplateError

        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                tools=None, documents=None, **self.special_tokens,
            )
        except TemplateError as exc:
            raise ValueError(f"chat template of {self.source} rejected the messages: {exc}") from None

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = True
    ) -> list[int] | str:
        text = self.render_chat(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _byte_level_backend(meta: dict, tokens: list[str], path: Path):
    """`(backend, vocab, is_whole)` of a "gpt2" file: tokens spelled in GPT-2's byte alphabet."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models

    alphabet = set(byte_to_unicode().values())

    def spelled(token: str) -> str:  # a token outside the byte alphabet is raw UTF-8 text
        if set(token) <= alphabet:
            return token
        return "".join(byte_to_unicode()[b] for b in token.encode("utf-8"))

    vocab = {spelled(token): token_id for token_id, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre"), path)
    backend.decoder = decoders.ByteLevel()
    return backend, vocab, lambda token: set(token) <= alphabet


SPACE_MARKER = "\u2581"  # SentencePiece's "▁": a space inside a token
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# The text part of the chat template of Google's Gemma 3 releases (a system message is
# prefixed to the first user turn; the model's turns are "model").
GEMMA_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim -}}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""


def _sentencepiece_backend(meta: dict, tokens: list[str], architecture: str | None):
    """`(backend, vocab)` of a "llama" file, built as transformers' GGUF loader builds it.

    SentencePiece BPE as `tokenizers` runs it: BPE over "▁"-marked text with byte fallback
    (<0xNN> tokens for bytes no piece covers). The files store pieces and scores but (mostly)
    no merges, so the merges are recovered from the vocabulary: every split of a piece into two
    pieces, ranked by the merged piece's score (Llama 2, Mistral), or for Gemma by its position
    in the file (Gemma's scores do not follow its merge order). Gemma files also spell pieces of
    two or more spaces with real spaces, which are respelled "▁▁..." first. Gemma puts no space
    before the text (its normalizer only turns spaces into "▁"); Llama 2 style files prepend
    "▁" to the first word (Metaspace, prepend_scheme "first").
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    is_gemma = architecture in GEMMA_ARCHITECTURES
    if is_gemma:
        tokens = [SPACE_MARKER * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    elif is_gemma:
        merges = _merges_from_vocab(vocab, {token: -i for i, token in enumerate(tokens)})
    else:
        merges = _merges_from_vocab(vocab, dict(zip(tokens, meta["tokenizer.ggml.scores"])))
    unk = tokens[meta["tokenizer.ggml.unknown_token_id"]] if isinstance(
        meta.get("tokenizer.ggml.unknown_token_id"), int) else None
    decode_steps = [decoders.Replace(SPACE_MARKER, " "), decoders.ByteFallback(), decoders.Fuse()]
    if is_gemma:
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk,
                                     byte_fallback=True))
        backend.normalizer = normalizers.Replace(" ", SPACE_MARKER)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPACE_MARKER, prepend_scheme="first", split=False)
        decode_steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decode_steps)
    return backend, vocab


def _merges_from_vocab(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: each piece's splits into two pieces, best score first
    (ties: the longer left part, then the longer right part; then by the parts' ids), as
    transformers derives them."""
    ranked = []
    for piece, score in scores.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((left, right, score) for left, right in splits)
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _gguf_pre_tokenizer(pre_type: str | None, path: Path):
    from tokenizers import Regex, pre_tokenizers

    split = GGUF_PRE_TOKENIZER_SPLITS.get(pre_type or "default")
    if split is None:
        if pre_type not in (None, *_GPT2_REGEX_PRE_TYPES):
            logger.warning("%s: unknown tokenizer.ggml.pre %r; splitting text with GPT-2's regex",
                           path, pre_type)
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc}); re-download the file") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object; re-download the file")
    return value
