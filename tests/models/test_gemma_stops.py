"""Gemma chat turns end with <end_of_turn>: it is a stop token next to <eos>, wherever it comes from.

Gemma GGUF files name only <eos> (`tokenizer.ggml.eos_token_id`); the turn end is found by its
text, as llama.cpp finds it, whether the converter typed it control or user-defined, or named
by `tokenizer.ggml.eot_token_id`. A tiny gemma3 vocabulary written here (no chat template, so
docpipe's Gemma turn format applies) checks the stop ids; a tiny random gemma3 model whose
logits always favour one token checks that the engine ends a chat reply on <end_of_turn>
and on <eos>, and runs on when the vocabulary leaves <end_of_turn> a plain piece.

The embedded gemma-3-270m is a base model: greedy replies to chat prompts never produce
<end_of_turn> (they run on to the length limit, e.g. "Say hello." -> " mendatanguser\\nSay
hello." repeated), so a real generation cannot show the stop; its stop ids ({1, 106}) and its
chat rendering against transformers are checked in test_gemma_gguf.py.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from models.config import tiny_config
from models.engine.engine import EngineConfig, LLMEngine
from models.engine.runner import kv_bytes_per_token
from models.engine.sampling import SamplingParams
from models.loading import build_model
from models.tokenizer import GEMMA_CHAT_TEMPLATE, Tokenizer

CONTROL, NORMAL, USER_DEFINED, BYTE = 3, 1, 4, 6
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN = range(len(SPECIALS))
PIECES = ["\u2581", "u", "s", "e", "r", "m", "o", "d", "l", "h", "i", "\u2581h", "hi", "\u2581hi",
          "er", "us", "user", "el", "mo", "mod", "model"]
VOCAB = len(SPECIALS) + 256 + len(PIECES)
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "hi"}]


def write_gemma_vocab(path, end_of_turn_type: int = CONTROL, eot_token_id: int | None = None):
    """A gemma3 file's tokenizer as llama.cpp writes it (the model tensors are left out)."""
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_string("tokenizer.ggml.model", "llama")
    tokens = [*SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *PIECES]
    types = [CONTROL, CONTROL, CONTROL, 2, CONTROL, end_of_turn_type] + [BYTE] * 256 + [NORMAL] * len(PIECES)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", [0.0] * len(SPECIALS + ["b"] * 256) +
                     [-float(i) for i in range(len(PIECES))])
    writer.add_array("tokenizer.ggml.token_type", types)
    for key, value in (("bos", BOS), ("eos", EOS), ("unknown", UNK), ("padding", PAD)):
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    if eot_token_id is not None:
        writer.add_uint32("tokenizer.ggml.eot_token_id", eot_token_id)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("how", ["control", "user_defined", "eot_token_id"])
def test_end_of_turn_is_a_stop_token(tmp_path, how):
    kind = {"control": CONTROL, "user_defined": USER_DEFINED, "eot_token_id": NORMAL}[how]
    path = write_gemma_vocab(tmp_path / "gemma.gguf", kind,
                             END_OF_TURN if how == "eot_token_id" else None)
    tok = Tokenizer.from_gguf(path)
    assert tok.chat_template == GEMMA_CHAT_TEMPLATE  # the file has none
    assert tok.stop_token_ids == {EOS, END_OF_TURN}
    ids = tok.apply_chat_template(MESSAGES)
    assert ids[0] == BOS and ids.count(START_OF_TURN) == 4 and ids.count(END_OF_TURN) == 3
    if how != "eot_token_id":  # a special token: whole in the prompt, dropped from replies
        assert tok.decode([*ids[-3:], END_OF_TURN]) == "model\n"


def test_plain_end_of_turn_piece_is_no_stop(tmp_path):
    """The control for the tests here: nothing names it, so it is not a stop token."""
    tok = Tokenizer.from_gguf(write_gemma_vocab(tmp_path / "gemma.gguf", NORMAL))
    assert tok.stop_token_ids == {EOS}


def always_says(token_id: int, seed: int = 0):
    """A tiny random gemma3 whose greedy choice after any prompt is `token_id`: the blocks
    write nothing to the residual (o_proj, down_proj zero), and the tied embedding rows share
    one direction that `token_id`'s row has three times over."""
    config = tiny_config("gemma3_text", vocab_size=VOCAB)
    model = build_model(config, torch.float32, "cpu").init_random_weights(seed=seed, std=0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        shared = torch.randn(config.hidden_size, generator=g)
        rows = shared + 0.05 * torch.randn(VOCAB, config.hidden_size, generator=g)
        rows[token_id] = 3 * shared
        model.embed_tokens.copy_(rows)
    return model


def reply(model, tok, params: SamplingParams):
    budget = 64 * 16 * kv_bytes_per_token(model)
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_memory_bytes=budget))
    engine.add_request("r0", tok.apply_chat_template(MESSAGES), params)
    while engine.has_unfinished():
        done = engine.step()
    return done[0]


@pytest.mark.parametrize("stop_id", [END_OF_TURN, EOS])
def test_engine_ends_a_reply_on_end_of_turn_and_eos(tmp_path, stop_id):
    tok = Tokenizer.from_gguf(write_gemma_vocab(tmp_path / "gemma.gguf"))
    model = always_says(stop_id)
    out = reply(model, tok, SamplingParams(max_tokens=8, temperature=0.0))
    assert (out.finish_reason, out.token_ids, out.text) == ("stop", [stop_id], "")
    out = reply(model, tok, SamplingParams(max_tokens=8, temperature=0.0, min_tokens=3))
    assert out.finish_reason == "stop" and len(out.token_ids) == 4  # masked until 3 are out
    assert out.token_ids[-1] == stop_id and stop_id not in out.token_ids[:3]


def test_engine_runs_on_when_end_of_turn_is_a_plain_piece(tmp_path):
    tok = Tokenizer.from_gguf(write_gemma_vocab(tmp_path / "gemma.gguf", NORMAL))
    out = reply(always_says(END_OF_TURN), tok, SamplingParams(max_tokens=8, temperature=0.0))
    assert (out.finish_reason, out.token_ids) == ("length", [END_OF_TURN] * 8)
