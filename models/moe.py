"""Mixture-of-experts feed-forward block, its gate, and the load-balancing losses.

Dispatch groups tokens by expert instead of looping over tokens:

    router logits [N, E] -> scores (softmax, or sigmoid for DeepSeek-V3)
    -> top-k on score + selection bias (weights [N, K] from the unbiased score, expert ids [N, K])
    flatten the N*K (token, expert) pairs, stable-sort them by expert id
    for each expert with work: one SwiGLU matmul chain over its contiguous slice
    scale by the routing weight, unsort, sum each token's K rows

The gate (`route`) covers three weightings: the softmax top-k of mixtral / qwen2_moe (weights
optionally renormalised over the K chosen), DeepSeek-V3's (sigmoid scores, group-limited
selection on score + e_score_correction_bias, renormalised, times routed_scaling_factor), and
docpipe_moe's hard gate (every chosen expert weighted 1, which at K = E is the dense FFN
that `docpipe moefy` split). The selection bias (`e_score_correction_bias`, zeros unless a
checkpoint or `docpipe calibrate --balance` sets it) only changes which experts are chosen.

Every forward adds its per-expert token counts (each token counted once per chosen expert, so
they sum to N*K) to `expert_counts`, and, when given a `RouteStats`, to the row of the sequence
that sent the token, so an engine can attribute expert usage to requests.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from models.config import ModelConfig
from models.layers import GatedMLP, Linear, empty_param, linear, param_dtype, silu_mul


def moe_gate(
    router_logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k gate: (weights [N, K] fp32, expert ids [N, K])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


def route(
    router_logits: torch.Tensor,  # [N, E]
    top_k: int,
    *,
    scoring_func: str = "softmax",
    selection_bias: torch.Tensor | None = None,  # [E] fp32, added for the choice only
    n_group: int = 1,
    topk_group: int = 1,
    normalize: bool = True,
    routed_scaling_factor: float = 1.0,
    hard: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate: (weights [N, K] fp32, expert ids [N, K]).

    scores = softmax or sigmoid of the logits (fp32); experts are chosen on scores + bias,
    among the topk_group groups (of E / n_group consecutive experts) whose two best biased
    scores sum highest (DeepSeek-V3; n_group = 1: no group limit); weights are the chosen
    unbiased scores, renormalised when `normalize`, times routed_scaling_factor; `hard`:
    every chosen expert weighs 1. With no bias, n_group = 1 and softmax this is `moe_gate`.
    """
    logits = router_logits.float()
    scores = torch.sigmoid(logits) if scoring_func == "sigmoid" else torch.softmax(logits, -1)
    choice = scores if selection_bias is None else scores + selection_bias
    if n_group > 1:
        N, E = choice.shape
        grouped = choice.view(N, n_group, E // n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [N, n_group]
        group_ids = torch.topk(group_scores, topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    expert_ids = torch.topk(choice, top_k, dim=-1)[1]
    if hard:
        return torch.ones(expert_ids.shape, dtype=torch.float32), expert_ids
    weights = scores.gather(1, expert_ids)
    if normalize:
        # DeepSeek-V3 guards the sum (sigmoid scores can all be ~0); softmax's never is
        eps = 1e-20 if scoring_func == "sigmoid" else 0.0
        weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, expert_ids


@dataclass(slots=True)
class RouteStats:
    """Per-sequence expert accounting for one forward pass."""

    token_seq_ids: torch.Tensor  # [N] which sequence (row of counts) each token belongs to
    counts: torch.Tensor  # [B, L, E] int64: per sequence, MoE layer (SparseMoeBlock.moe_index)
    # and expert


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, H, I = config.num_local_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        self.scoring_func, self.hard = config.scoring_func, config.hard_gate
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        # DeepSeek-V3's router is fp32 whatever the model dtype (transformers'
        # DeepseekV3TopkRouter: an fp32 weight, inputs cast up): bf16 logits can pick other
        # experts. Kept in fp32 here, so no step casts the weight.
        self.fp32_router = config.scoring_func == "sigmoid"
        with param_dtype(torch.float32) if self.fp32_router else nullcontext():
            self.gate = Linear(H, E)
        self.w13 = empty_param(E, 2 * I, H)  # per expert: [gate; up], HF [out, in] layout
        self.w2 = empty_param(E, H, I)  # per expert: down
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: Linear | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(H, config.shared_expert_intermediate_size)
            if config.shared_expert_gated:  # qwen2_moe: sigmoid(x . g) * shared(x)
                self.shared_expert_gate = Linear(H, 1)
        self.register_buffer("expert_counts", torch.zeros(E, dtype=torch.long), persistent=False)
        # Added to the scores for the choice of experts only (DeepSeek-V3's
        # e_score_correction_bias; `docpipe calibrate --balance` fits one for any gate).
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(E, dtype=torch.float32), persistent=False
        )
        self.has_selection_bias = False  # set by whoever writes the bias (skips an add if not)
        self.moe_index = 0  # this block's place among the model's MoE layers (set by the model)
        self.last_router_logits: torch.Tensor | None = None

    def router_logits(self, x: torch.Tensor, fixed_k: bool = False) -> torch.Tensor:
        """The gate's logits [N, E] for tokens x [N, H] (fp32 for the fp32 router)."""
        return self.gate(x.float() if self.fp32_router else x, fixed_k)

    def set_selection_bias(self, bias: torch.Tensor) -> None:
        self.e_score_correction_bias.copy_(bias.float())
        self.has_selection_bias = bool(bias.abs().sum() > 0)

    def forward(
        self, x: torch.Tensor, route_stats: RouteStats | None = None, keep_logits: bool = False,
        fixed_k: bool = False,
    ) -> torch.Tensor:
        """fixed_k: batch-invariant reductions (see `models.layers.linear`)."""
        N, H = x.shape
        router_logits = self.router_logits(x, fixed_k)  # [N, E]
        self.last_router_logits = router_logits if keep_logits else None
        weights, expert_ids = route(
            router_logits, self.top_k, scoring_func=self.scoring_func,
            selection_bias=self.e_score_correction_bias if self.has_selection_bias else None,
            n_group=self.n_group, topk_group=self.topk_group, normalize=self.normalize,
            routed_scaling_factor=self.routed_scaling_factor, hard=self.hard,
        )

        flat_ids = expert_ids.reshape(-1)  # [N*K]
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        self.expert_counts += counts
        if route_stats is not None:
            seq_ids = route_stats.token_seq_ids.repeat_interleave(self.top_k)
            layer_ids = torch.full_like(flat_ids, self.moe_index)
            route_stats.counts.index_put_(
                (seq_ids, layer_ids, flat_ids), torch.ones_like(flat_ids), accumulate=True
            )

        order = torch.argsort(flat_ids, stable=True)
        token_rows = order // self.top_k
        x_sorted = x.index_select(0, token_rows)
        out_sorted = torch.empty_like(x_sorted)
        start = 0
        for e, n in enumerate(counts.tolist()):  # one host sync per layer, not per token
            if n == 0:
                continue
            xs = x_sorted[start : start + n]
            h = silu_mul(linear(xs, self.w13[e], fixed_k=fixed_k))
            out_sorted[start : start + n] = linear(h, self.w2[e], fixed_k=fixed_k)
            start += n
        if not self.hard:  # hard gate: every weight is 1
            out_sorted = out_sorted * weights.reshape(-1)[order].unsqueeze(1).to(x.dtype)
        # Back to (token, choice) order, then each token's K rows summed in choice order: a
        # fixed order per token (batch-invariant), and several times faster on CPU than a
        # scatter-add into the token rows.
        out = out_sorted.new_empty(out_sorted.shape).index_copy_(0, order, out_sorted)
        out = out.view(N, self.top_k, H).sum(dim=1)
        if self.shared_expert is not None:
            shared = self.shared_expert(x, fixed_k)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x, fixed_k)) * shared
            out = out + shared
        return out


def switch_load_balancing_loss(
    router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Switch-Transformer loss `alpha * E * sum_i f_i * P_i` over all layers' tokens.

    f_i: fraction of (token, choice) assignments routed to expert i (sums to top_k);
    P_i: mean router probability of expert i. Equals transformers' `load_balancing_loss_func`.
    """
    logits = torch.cat([t.float().reshape(-1, num_experts) for t in router_logits])
    probs = torch.softmax(logits, dim=-1)
    _, chosen = torch.topk(probs, top_k, dim=-1)
    counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
    f = counts / logits.shape[0]
    p = probs.mean(dim=0)
    return alpha * num_experts * torch.sum(f * p)


def squared_deviation_loss(
    router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], alpha: float = 1.0
) -> torch.Tensor:
    """`alpha * sum_i (p_i - 1/E)^2`, p_i the mean router probability of expert i.

    Zero exactly when the gate spreads probability evenly; averaged over layers.
    """
    losses = []
    for t in router_logits:
        probs = torch.softmax(t.float().reshape(-1, t.shape[-1]), dim=-1)
        p = probs.mean(dim=0)
        losses.append(torch.sum((p - 1.0 / p.numel()) ** 2))
    return alpha * torch.stack(losses).mean()


# -- selection biases beside a checkpoint (`docpipe calibrate --balance`) -----------------
EXPERT_BIAS_FILE = "expert_bias.safetensors"


def expert_bias_name(layer_id: int) -> str:
    """DeepSeek-V3's HF name of a layer's selection bias."""
    return f"model.layers.{layer_id}.mlp.gate.e_score_correction_bias"


def save_expert_bias(directory, biases: dict[int, torch.Tensor]) -> None:
    """Write {layer: bias [E]} to directory/EXPERT_BIAS_FILE (temp file, then rename)."""
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(directory) / EXPERT_BIAS_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file({expert_bias_name(i): b.float().contiguous() for i, b in biases.items()}, str(tmp))
    tmp.replace(path)


def apply_expert_bias(model: nn.Module, directory) -> None:
    """Set the selection biases of directory/EXPERT_BIAS_FILE, if there is one."""
    from pathlib import Path

    from safetensors.torch import load_file

    from models.errors import ModelLoadError

    path = Path(directory) / EXPERT_BIAS_FILE
    if not path.is_file():
        return
    for name, bias in load_file(str(path)).items():
        layer_id = int(name.split(".")[2])
        layer = model.layers[layer_id] if layer_id < len(model.layers) else None
        if layer is None or not layer.is_moe or bias.shape != (layer.mlp.num_experts,):
            raise ModelLoadError(f"{path}: {name} {tuple(bias.shape)} does not fit this model "
                                 "(no such MoE layer or another expert count); delete the file "
                                 "or rerun docpipe calibrate --balance")
        layer.mlp.set_selection_bias(bias)
