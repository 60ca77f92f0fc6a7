"""Tokenizer: GGUF-built and HF-directory tokenizers give transformers' ids and chat prompts."""

import json
from functools import lru_cache

import gguf
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from models.errors import ModelLoadError
from models.tokenizer import Tokenizer, byte_to_unicode

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple   inner    spaces and a  1",
    "line one\nline two\n\n\nafter blanks\r\nwindows",
    "Numbers: 3.14159, 1,000,000 and 2024-01-31; x   2024",
    "def add(a, b):\n    return a + b  # sum\n\tindented_with_tab()\n",
    "Accents: café, naïve, Ærøskøbing, São Paulo, Übermaß",
    "CJK: 日本語のテキスト、中文句子。한국어 문장",
    "Emoji: 🎉👍🏽 👨‍👩‍👧 ❤️",
    "<|im_start|>user\nliteral special tokens<|im_end|>",
    "I'm sure you'll see they've DON'T",
    "",
    " ",
    "\n\n",
]

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Summarize: cats sleep."}],
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Translate 'chat' to French.\nThanks"},
    ],
]


@lru_cache(maxsize=1)
def gguf_tokenizer(path) -> Tokenizer:
    return Tokenizer.from_gguf(path)


@lru_cache(maxsize=1)
def reference_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@lru_cache(maxsize=1)
def vocab_bytes(path) -> frozenset[int]:
    vocab = gguf_tokenizer(path).backend.get_vocab()
    return frozenset(b for b, char in byte_to_unicode().items() if char in vocab)


# hypothesis tests cannot take function-scoped fixtures, so everything goes through the caches.
@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return gguf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return reference_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def ours_from_dir(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tokenizer")
    reference.save_pretrained(str(path))
    return Tokenizer.from_dir(path)


def reference_chat_ids(reference, messages) -> list[int]:
    ids = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


# -- quick checks of the GGUF tokenizer -------------------------------------------------------
def test_smollm2_special_tokens(ours):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.stop_token_ids == frozenset({0, 2})  # <|endoftext|>, <|im_end|>
    assert ours.vocab_size == 49152
    assert ours.encode("<|im_start|>") == [1]
    assert ours.encode("hello world", add_special_tokens=True) == ours.encode("hello world")


def test_smollm2_chat_prompt(ours):
    text = ours.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ours.apply_chat_template(CONVERSATIONS[1]) == ours.encode(text)
    no_prompt = ours.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=False, tokenize=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(ours, text):
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_any_text(smollm2_gguf, text):
    ours = gguf_tokenizer(smollm2_gguf)
    # SmolLM2's vocabulary lacks a few byte tokens (e.g. 0x04, 0xF1: no unk, so they are
    # dropped); round trips hold for text made of the bytes it has.
    assume(set(text.encode("utf-8")) <= vocab_bytes(smollm2_gguf))
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


# -- against transformers ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(ours, ours_from_dir, reference, text):
    want = reference.encode(text, add_special_tokens=False)
    assert ours.encode(text) == want
    assert ours_from_dir.encode(text) == want
    assert ours.decode(want) == reference.decode(want, skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["system_user", "user", "multi_turn"])
def test_chat_ids_match_transformers(ours, ours_from_dir, reference, messages):
    want_text = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = reference_chat_ids(reference, messages)
    assert ours.apply_chat_template(messages, tokenize=False) == want_text
    assert ours.apply_chat_template(messages) == want
    assert ours_from_dir.apply_chat_template(messages) == want


@pytest.mark.slow
def test_from_dir_special_tokens(ours, ours_from_dir):
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "stop_token_ids", "vocab_size"):
        assert getattr(ours_from_dir, attr) == getattr(ours, attr), attr


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=30))
def test_random_text_ids_match_transformers(smollm2_gguf, text):
    reference = reference_tokenizer(smollm2_gguf)
    assert gguf_tokenizer(smollm2_gguf).encode(text) == reference.encode(
        text, add_special_tokens=False
    )


# -- HF directories and errors ----------------------------------------------------------------
def write_tiny_dir(path, config: dict | None = None, template_file: str | None = None):
    """A word-level tokenizer.json (no downloads), with optional config and template file."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}
    backend = Backend(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>"])
    backend.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    if template_file is not None:
        (path / "chat_template.jinja").write_text(template_file)
    return path


def test_from_dir_template_sources(tmp_path):
    template = "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    config = {
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}],
    }
    tok = Tokenizer.from_dir(write_tiny_dir(tmp_path, config))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, None)
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}]) == [0, 3, 1]
    assert tok.stop_token_ids == frozenset({1})

    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }} world")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}]) == [3, 4]


def test_template_helpers(tmp_path):
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}"
        "{% endif %}{{ strftime_now('%Y')|length }} {{ messages|tojson }}"
        "{% generation %}{{ messages[0]['content'] }}{% endgeneration %}"
    )
    tok = Tokenizer.from_dir(write_tiny_dir(tmp_path, {"chat_template": template}))
    text = tok.apply_chat_template([{"role": "user", "content": "é"}], tokenize=False)
    assert text == '4 [{"role": "user", "content": "é"}]é'
    with pytest.raises(ValueError, match="first message must be user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_sandbox_blocks_attribute_escape(tmp_path):
    from jinja2.exceptions import SecurityError

    tok = Tokenizer.from_dir(write_tiny_dir(tmp_path, {"chat_template": "{{ messages.__class__.__mro__ }}"}))
    with pytest.raises((SecurityError, ValueError)):
        tok.apply_chat_template([], tokenize=False)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        Tokenizer.from_dir(tmp_path)
    assert "tokenizer.json" in str(info.value) and str(tmp_path) in str(info.value)


def test_missing_chat_template(tmp_path):
    tok = Tokenizer.from_dir(write_tiny_dir(tmp_path, {"eos_token": "</s>"}))
    assert tok.encode("hello world") == [3, 4]
    with pytest.raises(ModelLoadError) as info:
        tok.apply_chat_template([{"role": "user", "content": "hello"}])
    message = str(info.value)
    assert str(tmp_path) in message and "chat_template" in message and "\n" not in message


def test_bad_tokenizer_config(tmp_path):
    write_tiny_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


# A Llama 2 style SentencePiece vocabulary: control tokens, 256 byte-fallback pieces, then
# pieces ranked by score (the file has no merges: they are recovered from the pieces).
SPM_PIECES = ["\u2581", "e", "t", "h", "a", "c", "s", "i", "n", "o", "m", "\u2581t", "he", "\u2581the",
              "at", "\u2581c", "\u2581cat", "is", "\u2581is", "on", "\u2581on", "\u2581m", "\u2581mat",
              "\u2581a", "in", "\u2581in", "\u2581\u2581", "\u2581\u2581\u2581", "\u00e9", "caf"]
SPM_TEXTS = ["the cat is on the mat", " the cat", "  two spaces", "thé café\n\nnewlines\tand tabs",
             "日本 🤖 unknown pieces fall back to bytes", "<|im_end|> special and <think> user", "", " "]


def write_spm_gguf(path, add_bos: bool | None = True, template: str | None = None):
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("context_length", 64), ("embedding_length", 4), ("block_count", 1),
                       ("feed_forward_length", 8), ("attention.head_count", 1)):
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(f"llama.{key}", value)
    writer.add_string("tokenizer.ggml.model", "llama")
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES,
              "<|im_end|>", "<think>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [0.0, 0.0]
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", scores)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    if add_bos is not None:
        writer.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    if template is not None:
        writer.add_string("tokenizer.chat_template", template)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("add_bos", [True, False, None])
def test_gguf_sentencepiece_ids_match_transformers(tmp_path, add_bos):
    from transformers import AutoTokenizer

    template = "{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    path = write_spm_gguf(tmp_path / "spm.gguf", add_bos, template)
    ours = Tokenizer.from_gguf(path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in SPM_TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert ours.encode("the cat")[:1] == [259 + SPM_PIECES.index("\u2581the")]  # "▁" prepended
    assert ours.encode("日") == [259, 3 + 0xE6, 3 + 0x97, 3 + 0xA5]  # "▁", then byte fallback
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "is on"}]
    text = hf.apply_chat_template(messages, tokenize=False)
    assert ours.apply_chat_template(messages, tokenize=False) == text
    assert ours.apply_chat_template(messages) == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.stop_token_ids == {2, 259 + len(SPM_PIECES)}  # </s> and <|im_end|>


def test_gguf_unknown_tokenizer_type(tmp_path):
    path = tmp_path / "t5.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.ggml.model", "t5")
    writer.add_array("tokenizer.ggml.tokens", ["<unk>", "<s>", "</s>"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError) as info:
        Tokenizer.from_gguf(path)
    assert "t5.gguf" in str(info.value) and "'t5'" in str(info.value)
