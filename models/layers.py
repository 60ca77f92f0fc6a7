"""Building blocks shared by every architecture: RMSNorm, rotary embeddings, gated MLP.

Parameters are created with `torch.empty` (no initialisation cost: loading overwrites them)
directly in the dtype that `param_dtype` sets (no fp32 copy first: half the peak memory at a
bf16 load); `TransformerLM.init_random_weights` fills them for tests and benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from models import native
from models.config import ModelConfig
from models.quant import PackedWeight

_param_dtype = torch.float32


@contextmanager
def param_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters made inside are created in `dtype` (see the module docstring)."""
    global _param_dtype
    saved, _param_dtype = _param_dtype, dtype
    try:
        yield
    finally:
        _param_dtype = saved


def empty_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=_param_dtype), requires_grad=False)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim. `unit_offset` (Gemma): scale by (1 + weight), all in fp32,
    rounded once at the end, as Gemma's reference computes it."""

    def __init__(self, hidden_size: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = empty_param(hidden_size)
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset:
            normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        # As the HF reference: normalise in fp32, round to x's dtype, then scale.
        lib = native.elementwise(x)
        w = self.weight
        if (lib is not None and x.dim() == 2 and x.stride(1) == 1 and w.dtype == x.dtype
                and w.is_contiguous()):
            out = torch.empty(x.shape, dtype=x.dtype)
            lib.docpipe_rms_norm(native.DTYPES[x.dtype], x.data_ptr(), x.stride(0), w.data_ptr(),
                                 out.data_ptr(), x.shape[0], x.shape[1], self.eps)
            return out
        # torch's fused kernel gives the same values as the op-by-op form, several times faster
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


# oneDNN's reduced-precision GEMM on CPU picks its reduction blocking from the number of rows
# when the reduced dimension is long (measured: K = 1536 varies with M, K <= 1024 does not),
# so a row's value can depend on how many rows share the call. Batch-invariant runs reduce
# long K in fixed slices and sum the slices in fp32 instead.
INVARIANT_MAX_K = 1024
# MKL's fp32 GEMM (PyTorch's CPU path for fp32) computes rows in groups of 4: a row in a
# partial group at the end of a call (and a call of 1-3 rows: gemv and its kin) is computed
# another way, so its value depends on the call's row count. In whole groups every row has the
# same value whatever the row count or its position (measured for every SmolLM2 shape, up to
# 1024 rows, natively and under AVX2 emulation). Batch-invariant fp32 runs pad the rows to a
# multiple of this with zero rows.
INVARIANT_ROW_GROUP = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           fixed_k: bool = False) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; with fixed_k, rows that do not depend on x's row count
    (batch-invariant runs, see above). `weight` may be a `quant.PackedWeight` (GGUF blocks)."""
    if isinstance(weight, PackedWeight):
        y = weight.matmul(x, fixed_k)
        return y if bias is None else y + bias
    k = weight.shape[1]
    if fixed_k and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and (
            x.shape[0] % INVARIANT_ROW_GROUP):
        rows = x.shape[0]
        padded = torch.zeros(-(-rows // INVARIANT_ROW_GROUP) * INVARIANT_ROW_GROUP, k,
                             dtype=x.dtype)
        padded[:rows] = x
        return F.linear(padded, weight, bias)[:rows]
    if not fixed_k or k <= INVARIANT_MAX_K or x.device.type != "cpu" or x.dtype == torch.float32:
        return F.linear(x, weight, bias)
    parts = -(-k // INVARIANT_MAX_K)
    step = -(-k // parts)
    out = F.linear(x[:, :step], weight[:, :step]).float()
    for lo in range(step, k, step):
        out += F.linear(x[:, lo : lo + step], weight[:, lo : lo + step])
    if bias is not None:
        out += bias
    return out.to(x.dtype)


class Linear(nn.Module):
    """`y = x @ W.T (+ b)` with HF's [out, in] weight layout; no init cost."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = empty_param(out_features, in_features)
        self.bias = empty_param(out_features) if bias else None

    def forward(self, x: torch.Tensor, fixed_k: bool = False) -> torch.Tensor:
        """fixed_k: batch-invariant reduction (see `linear`)."""
        return linear(x, self.weight, self.bias, fixed_k)


class GatedMLP(nn.Module):
    """Gated MLP, act(gate) * up, with gate and up projections fused into one matmul:
    [gate; up] = x @ W13.T. act: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, Gemma)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.act_mul = ACT_MUL[act]

    def forward(self, x: torch.Tensor, fixed_k: bool = False) -> torch.Tensor:
        """fixed_k: batch-invariant reduction (see `linear`)."""
        return self.down_proj(self.act_mul(self.gate_up_proj(x, fixed_k)), fixed_k)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows [gate | up] (SwiGLU), rounded as the two torch ops round."""
    inter = gate_up.shape[-1] // 2
    lib = native.elementwise(gate_up)
    if lib is not None and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        out = torch.empty(gate_up.shape[0], inter, dtype=gate_up.dtype)
        lib.docpipe_silu_mul(native.DTYPES[gate_up.dtype], gate_up.data_ptr(), gate_up.stride(0),
                             out.data_ptr(), gate_up.shape[0], inter)
        return out
    gate, up = gate_up.split(inter, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu(gate, tanh approximation) * up for rows [gate | up] (GeGLU)."""
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


# hidden_act -> act(gate) * up over [gate | up] rows
ACT_MUL = {"silu": silu_mul, "gelu_pytorch_tanh": gelu_tanh_mul}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor for a context stretched `scale` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(config: ModelConfig, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (deepseek_v3): dims that turn fewer than beta_slow times over the original
    context are interpolated (divided by factor), those over beta_fast kept, a linear ramp
    between; cos/sin are multiplied by mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    (the softmax scale takes mscale(factor, mscale_all_dim)**2, see models.mla). As
    transformers computes it, in fp32."""
    dim, base = config.head_dim, config.rope_theta
    old_ctx = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = scaling.get("factor") or config.max_position_embeddings / old_ctx
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(old_ctx / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


def _rope_inv_freq(config: ModelConfig, local: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the rotary dims, with llama3/linear/yarn scaling applied; computed
    in fp32 as the reference computes them (fp64 gives other last bits: 1 ulp on 1/3 of
    SmolLM2's frequencies, enough to change 486 of its 164K bf16 cos/sin values at 1.5K-4K).
    `local`: the sliding layers' base (rope_local_base_freq), unscaled (gemma3)."""
    dim = config.head_dim
    theta = config.rope_local_base_freq if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = {} if local else config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(is_mid, mid, scaled)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(config, scaling)
        return inv_freq.float(), attention_factor
    return inv_freq.float(), 1.0


class RotaryEmbedding(nn.Module):
    """Half-split ("rotate_half") RoPE, computed from explicit positions.

    Positions come per token (the batch is a flat list of tokens from many sequences), so the
    cos/sin rows are looked up from a table that grows on demand instead of being sliced.

    `inv_freq` and the table stay fp32 whatever the model's dtype, as in the reference (which
    rounds only the looked-up cos/sin to the activations' dtype): `inv_freq` is a plain
    attribute, not a buffer, so `model.to(torch.bfloat16)` cannot round it (a bf16 `inv_freq`
    puts the angle 3.5 rad off by position 2500). The table follows the positions' device.
    """

    def __init__(self, config: ModelConfig, local: bool = False) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inv_freq(config, local)
        self.inv_freq = inv_freq  # fp32 [D/2], CPU
        self._cos_sin: torch.Tensor | None = None  # [P, D] cos | [P, D] sin, fp32

    def _table(self, num_positions: int, device: torch.device) -> torch.Tensor:
        table = self._cos_sin
        if table is None or table.shape[1] < num_positions or table.device != device:
            size = max(num_positions, 4096)
            size = 1 << (size - 1).bit_length()
            t = torch.arange(size, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device=device, dtype=torch.float32))
            emb = torch.cat((freqs, freqs), dim=-1)
            table = torch.stack((emb.cos(), emb.sin())) * self.attention_scaling
            self._cos_sin = table
        return table

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [N, 1, D] for positions [N]."""
        table = self._table(int(positions.max()) + 1 if positions.numel() else 1, positions.device)
        cos_sin = table[:, positions].to(dtype)
        return cos_sin[0].unsqueeze(1), cos_sin[1].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, H, D] (rows may be strided); cos/sin: [N, 1, D] in x's dtype. -> [N, H, D]"""
    N, H, D = x.shape
    lib = native.elementwise(x)
    if (lib is not None and x.stride(2) == 1 and x.stride(1) == D and cos.dtype == x.dtype
            and sin.dtype == x.dtype and cos.stride(0) == D and cos.stride(2) == 1
            and sin.stride() == cos.stride() and D % 2 == 0):
        out = torch.empty(N, H, D, dtype=x.dtype)
        lib.docpipe_rotary(native.DTYPES[x.dtype], x.data_ptr(), x.stride(0), out.data_ptr(),
                           N, H, D, cos.data_ptr(), sin.data_ptr())
        return out
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
