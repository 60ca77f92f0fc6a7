"""GGUF block dequantizers (Q5_0, Q5_1 and the k-quants Q2_K..Q6_K) against gguf-py's reference.

Random block bytes are valid blocks of every type once their fp16 scales are finite, so each
test draws random bytes, overwrites the scale fields with random finite fp16 values, and
compares docpipe's dequantization with `gguf.quants.dequantize` bit for bit. Exact equality is
expected, not only fp32-close: every product of an fp16 scale (11 significant bits), a
sub-block scale (at most 7: Q6_K's int8) and a quant (at most 6) fits fp32's 24-bit
significand, so the only rounding step is the one subtraction of the min (Q4_1/Q5_1/Q2_K/Q4_K/
Q5_K), which both implementations do once, in fp32; the order of the products cannot matter.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from models.errors import ModelLoadError
from models.gguf import TENSOR_FORMATS, open_gguf
from tests.models.test_gguf import one_line_error, write_gguf

# Byte offsets of the fp16 fields in each block (ggml's block_* structs), written out here
# independently of models/gguf.py.
FP16_FIELDS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),  # scales[16] qs[64] | d dmin
    Q.Q3_K: (108,),  # hmask[32] qs[64] scales[12] | d
    Q.Q4_K: (0, 2),  # d dmin | scales[12] qs[128]
    Q.Q5_K: (0, 2),  # d dmin | scales[12] qh[32] qs[128]
    Q.Q6_K: (208,),  # ql[128] qh[64] scales[16] | d
}
NEW_TYPES = [Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def random_blocks(qtype: Q, num_blocks: int, seed: int = 0) -> np.ndarray:
    """[num_blocks, type_size] random bytes with finite fp16 scales over many magnitudes, plus
    the edge blocks: all bits set, all zero, the largest and a subnormal scale, negative ones."""
    rng = np.random.default_rng(seed)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (num_blocks, type_size), dtype=np.uint8)
    blocks[0], blocks[1] = 0xFF, 0x00
    for start in FP16_FIELDS[qtype]:
        scale = rng.standard_normal(num_blocks) * 10.0 ** rng.uniform(-6, 4, num_blocks)
        scale = scale.astype(np.float16)
        scale[0], scale[2], scale[3] = 65504.0, np.float16(6e-8), -1.5  # max, subnormal
        assert np.isfinite(scale).all()
        blocks[:, start : start + 2] = scale.view(np.uint8).reshape(num_blocks, 2)
    return blocks


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and want.dtype == np.float32
    assert got.shape == want.shape
    mismatched = got.view(np.uint32) != want.view(np.uint32)  # also tells -0.0 from 0.0
    assert not mismatched.any(), (
        f"{mismatched.sum()} of {got.size} values differ; first at {np.argwhere(mismatched)[0]}: "
        f"{got[mismatched][0]!r} vs {want[mismatched][0]!r}"
    )


@pytest.mark.parametrize("qtype", list(FP16_FIELDS), ids=lambda q: q.name)
def test_random_blocks_match_gguf_reference_bit_for_bit(qtype):
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    blocks = random_blocks(qtype, 2000)
    want = gguf.quants.dequantize(blocks.reshape(-1), qtype).reshape(len(blocks), block_size)
    got = TENSOR_FORMATS[int(qtype)].dequantize(blocks)
    assert_bits_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda q: q.name)
def test_every_block_byte_matters(qtype):
    """Flipping any one byte outside the scale fields changes the output (no byte ignored or
    read twice into the wrong place) exactly where the reference changes."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    base = random_blocks(qtype, 5, seed=3)[4:].copy()  # an ordinary random block
    scale_bytes = {s + k for s in FP16_FIELDS[qtype] for k in (0, 1)}
    flipped = np.repeat(base, type_size, axis=0)
    for i in range(type_size):
        if i not in scale_bytes:
            flipped[i, i] ^= 0xA5
    want = gguf.quants.dequantize(flipped.reshape(-1), qtype).reshape(type_size, block_size)
    got = TENSOR_FORMATS[int(qtype)].dequantize(flipped)
    assert_bits_equal(got, want.astype(np.float32))
    reference = TENSOR_FORMATS[int(qtype)].dequantize(base)
    changed = (got != reference).any(axis=1)
    assert changed[[i for i in range(type_size) if i not in scale_bytes]].all()


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda q: q.name)
def test_file_tensor_shape_and_values(tmp_path, qtype):
    """Through a GGUF file: a [rows, 512] tensor of raw blocks reads back in torch order."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 6, 512
    blocks = random_blocks(qtype, rows * cols // block_size, seed=5)
    write_gguf(tmp_path / "k.gguf", "llama",
               {"w": (blocks.reshape(rows, cols // block_size * type_size), qtype)})
    got = open_gguf(tmp_path / "k.gguf").read_tensor("w")
    want = gguf.quants.dequantize(blocks.reshape(-1), qtype).reshape(rows, cols)
    assert got.flags.writeable
    assert_bits_equal(got, want.astype(np.float32))


def test_unknown_type_is_one_clear_error(tmp_path):
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
    raw = np.zeros((4, 256 // block_size * type_size), np.uint8)
    write_gguf(tmp_path / "iq.gguf", "llama", {"blk.0.ffn_up.weight": (raw, Q.IQ2_XXS)})
    message = one_line_error(open_gguf(tmp_path / "iq.gguf").read_tensor, "blk.0.ffn_up.weight")
    assert str(tmp_path / "iq.gguf") in message  # the file
    assert "blk.0.ffn_up.weight" in message and "IQ2_XXS" in message  # the tensor and type
    assert "Q4_K" in message and "Q6_K" in message and "re-quantize" in message  # the fix


def test_truncated_k_quant_tensor(tmp_path):
    blocks = random_blocks(Q.Q4_K, 8)
    write_gguf(tmp_path / "full.gguf", "llama", {"w": (blocks.reshape(4, -1), Q.Q4_K)})
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-200])
    message = one_line_error(open_gguf(tmp_path / "cut.gguf").read_tensor, "w")
    assert "cut.gguf" in message and "truncated" in message and "re-download" in message
    with pytest.raises(ModelLoadError):
        open_gguf(tmp_path / "cut.gguf").read_tensor("w")


# -- real tensors of the embedded Qwen2.5-Coder file -----------------------------------------
@pytest.fixture(scope="module")
def qwen_gguf():
    from models.registry import QWEN_CODER_NAME, embedded_model_path, pip_command

    try:
        return embedded_model_path(QWEN_CODER_NAME)
    except ModelLoadError as exc:
        if "not installed" not in str(exc):
            raise
        pytest.skip(f"{QWEN_CODER_NAME} is not installed: run `{pip_command(QWEN_CODER_NAME)}`")


@pytest.mark.slow  # gguf-py parses the 150k-token header in Python (~7 s)
def test_real_qwen_tensors_match_gguf_reference(qwen_gguf):
    """The smallest tensor of each type in the Q4_K_M file (Q4_K, Q5_0, Q6_K, Q8_0, F32)."""
    reader = gguf.GGUFReader(qwen_gguf)
    smallest: dict[Q, gguf.ReaderTensor] = {}
    for tensor in reader.tensors:
        best = smallest.get(tensor.tensor_type)
        if best is None or tensor.n_elements < best.n_elements:
            smallest[tensor.tensor_type] = tensor
    assert {Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q8_0, Q.F32} <= set(smallest)
    ours = open_gguf(qwen_gguf)
    for qtype, tensor in smallest.items():
        got = ours.read_tensor(tensor.name)
        want = gguf.quants.dequantize(tensor.data, qtype).astype(np.float32)
        assert_bits_equal(got, want.reshape(got.shape))
