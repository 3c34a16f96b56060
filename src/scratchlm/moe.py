"""Mixture of experts: a router picks a few SwiGLU experts for each token (Mixtral, Qwen3-MoE).

A dense block's MLP is replaced by ``n_experts`` MLPs of hidden size ``d_ff_expert``;
each token goes through only ``experts_per_token`` (k) of them:

    x (N, d_model)                              N = B * T tokens
    logits = router(x)                          (N, E)   a linear layer, no bias
    probs = softmax(logits)                     (N, E)   over the experts, in float32
    weights, experts = top_k(probs)             (N, k)   the k most probable experts
    weights /= weights.sum(-1)                  (N, k)   renormalised (norm_topk_prob)
    y[n] = sum_j weights[n, j] * expert_{experts[n, j]}(x[n])

Renormalising the top-k probabilities equals Mixtral's softmax over the top-k logits
(softmax is shift-invariant, so the common denominator cancels).

The experts' weights are stacked, ``gate_up_proj`` (E, 2 * d_ff_expert, d_model) and
``down_proj`` (E, d_model, d_ff_expert), and computed grouped by expert: the N * k
(token, expert) assignments are sorted by expert, each expert that received tokens runs
one matmul over all of them (on the CPU all experts in one ``F.grouped_mm``, where
PyTorch has it), and the results are added back to their tokens. A single token at
decode time skips the sorting and calls its k experts (``MoE.one_token``). A token
costs k experts' weights, not E: the *active* parameters decide
the compute per token (``Transformer.num_active_parameters``), the total ones the memory.

Training adds ``router_aux_loss_coef * load_balancing_loss(...)`` (Switch Transformer's
auxiliary loss) so the router does not collapse onto a few experts: the training core
does it for every task (``add_balancing_loss``).

>>> import torch
>>> from scratchlm.config import ModelConfig
>>> moe = MoE(ModelConfig.preset("moe-tiny"))
>>> moe(torch.randn(2, 3, 64)).shape
torch.Size([2, 3, 64])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


def route(logits: torch.Tensor, k: int, norm_topk_prob: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts), each (N, k): the k most probable experts of each token and their
    router probabilities, renormalised to sum to 1 if ``norm_topk_prob``. logits: (N, E)."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
    weights, experts = torch.topk(probs, k, dim=-1)  # (N, k), most probable first
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def experts_forward(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                    expert: Callable[[int, torch.Tensor], torch.Tensor], n_experts: int) -> torch.Tensor:
    """sum_j weights[n, j] * expert(experts[n, j], x[n]), grouped by expert.

    x (N, d); weights, experts (N, k); expert(e, x_e) runs expert e on its tokens x_e (n, d)
    and returns (n, d) -> (N, d).
    """
    N, k = experts.shape
    flat = experts.flatten()  # (N * k,) the expert of each (token, slot) assignment
    order = flat.argsort(stable=True)  # assignments grouped by expert
    tokens = order // k  # the token of each sorted assignment
    scale = weights.flatten()[order].to(x.dtype)  # (N * k,) its router weight
    # The group sizes are needed on the host to slice the groups (one sync per layer).
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = tokens[start:start + n]  # (n,) the tokens routed to expert e
        y = expert(e, x[idx])  # (n, d): one matmul pair for all of expert e's tokens
        out.index_put_((idx,), y * scale[start:start + n, None], accumulate=True)  # out[idx] += ...
        start += n
    return out


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert, down(silu(gate(x)) * up(x)): x (n, d), gate_up (2f, d) = [gate; up],
    down (d, f) -> (n, d)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # (n, f) each
    return F.linear(F.silu(gate) * up, down)


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up_proj: torch.Tensor,
                    down_proj: torch.Tensor) -> torch.Tensor:
    """experts_forward on the stacked matrices in two grouped matmuls (F.grouped_mm): each
    expert's sorted rows times its own matrix, one kernel for all experts, and no host sync
    (the group ends stay a tensor). x (N, d); weights, experts (N, k); gate_up_proj
    (E, 2f, d), down_proj (E, d, f) -> (N, d)."""
    N, k = experts.shape
    flat = experts.flatten()  # (N * k,) the expert of each (token, slot) assignment
    order = flat.argsort(stable=True)  # assignments grouped by expert
    tokens = order // k  # the token of each sorted assignment
    ends = torch.bincount(flat, minlength=gate_up_proj.shape[0]).cumsum(0).to(torch.int32)  # (E,) group ends
    gate, up = F.grouped_mm(x[tokens], gate_up_proj.transpose(1, 2), offs=ends).chunk(2, dim=-1)  # (N * k, f)
    y = F.grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=ends)  # (N * k, d)
    scale = weights.flatten()[order].to(x.dtype)[:, None]  # (N * k, 1) the router weights
    return torch.zeros_like(x).index_add_(0, tokens, y * scale)  # out[tokens] += ...


class MoE(nn.Module):
    """The mixture-of-experts MLP of a block: router, top-k, grouped SwiGLU experts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, d, f = config.n_experts, config.d_model, config.d_ff_expert
        self.k, self.norm_topk_prob = config.experts_per_token, config.norm_topk_prob
        self.aux_loss_coef = config.router_aux_loss_coef  # add_balancing_loss's weight
        self.router = nn.Linear(d, E, bias=False)
        # Expert e's SwiGLU: gate_up_proj[e] = [gate (f, d); up (f, d)], down_proj[e] (d, f).
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, f))
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.router_logits: torch.Tensor | None = None  # (N, E) of the last training forward
        self.n_experts, self.d_ff_expert = E, f
        self.expert_layers: nn.ModuleList | None = None  # set by decode_weights.prepare_for_decode

    def __getstate__(self):
        """Copies and pickles leave out the last forward's router logits (a part of that
        forward's autograd graph, which cannot be copied), as they do the graph itself."""
        state = self.__dict__.copy()
        state["router_logits"] = None
        return state

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU, down(silu(gate(x)) * up(x)), on its tokens x (n, d) -> (n, d)."""
        if self.expert_layers is not None:  # a decode layout: two layers per expert
            gate_up, down = self.expert_layers[e]
            gate, up = gate_up(x).chunk(2, dim=-1)
            return down(F.silu(gate) * up)
        return swiglu(x, self.gate_up_proj[e], self.down_proj[e])

    def one_token(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The MoE of a single token, x (1, d), logits (1, E) -> (1, d): the decode step at
        batch 1. The same sum as route + experts_forward, with the fewest ops: at this size
        each op costs about as much as a quantized expert's matmul, so there is no sort,
        count or scatter into a zeroed output, only the k experts' calls on their own
        weights (views, nothing copied). Inference only: the router weights are read as
        floats, no gradient reaches the router. Reading k ints from a CPU tensor costs
        nothing; on a GPU it is one sync per layer, as the grouped path's counts are."""
        if self.norm_topk_prob:  # softmax over the top-k logits = the renormalised top-k probabilities
            top, experts = logits.topk(self.k, dim=-1)  # (1, k)
            weights = F.softmax(top, dim=-1, dtype=torch.float32)
        else:
            weights, experts = route(logits, self.k, norm_topk_prob=False)
        y = None
        for w, e in zip(weights[0].tolist(), experts[0].tolist()):
            h = self.expert(e, x)  # (1, d)
            y = h * w if y is None else y.add_(h, alpha=w)  # y += w * h, one op
        return y

    def set_expert_layers(self, layers: list[list[nn.Module]]) -> None:
        """Replace the stacked expert weights by per-expert layers [gate_up, down] (any
        Linear-like module: decode_weights' int8, int4, transposed ...); inference only."""
        self.expert_layers = nn.ModuleList(nn.ModuleList(pair) for pair in layers)
        del self.gate_up_proj, self.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, d = x.shape, x.shape[-1]
        x = x.reshape(-1, d)  # (N, d): every token on its own, (B, T) or unpadded (n,)
        logits = self.router(x)  # (N, E)
        if self.training:  # kept for the load-balancing loss (Transformer.router_logits)
            self.router_logits = logits
        if x.shape[0] == 1 and not torch.is_grad_enabled():  # batch-1 decode: the k experts, nothing else
            y = self.one_token(x, logits)
        else:
            y = self.many_tokens(x, *route(logits, self.k, self.norm_topk_prob))
        return self.dropout(y.view(shape))

    def many_tokens(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """experts_forward for N tokens (training, a prompt, a batch), the fastest way the
        weights allow. x (N, d); weights, experts (N, k) -> (N, d)."""
        if self.expert_layers is not None:  # a decode layout: one call per expert that has tokens
            return experts_forward(x, weights, experts, self.expert, self.n_experts)
        if x.device.type == "cpu" and hasattr(F, "grouped_mm"):  # PyTorch >= 2.10: two grouped matmuls
            return grouped_experts(x, weights, experts, self.gate_up_proj, self.down_proj)
        # Otherwise one matmul pair per expert, on the stacked matrices split by one unbind,
        # not sliced per expert (gate_up_proj[e]): a slice's backward writes its gradient
        # into a zeroed (E, ...) tensor, E of them per matrix, all added up; unbind's stacks
        # the E gradients once.
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        return experts_forward(x, weights, experts, lambda e, x_e: swiglu(x_e, gate_up[e], down[e]), self.n_experts)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, experts_per_token={self.k}, d_ff_expert={self.d_ff_expert}"


def load_balancing_loss(router_logits: list[torch.Tensor], k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, as transformers' ``load_balancing_loss_func``:

        E * sum_e load_e * importance_e

    over the tokens of every layer together: load_e is the fraction of tokens routed to
    expert e (summed over the k slots, so the loads sum to k), importance_e the mean router
    probability of e. It is smallest (k) when both are uniform. router_logits: per MoE
    layer (N, E)."""
    logits = torch.cat(router_logits)  # (L * N, E)
    E = logits.shape[-1]
    probs = F.softmax(logits.float(), dim=-1)
    chosen = probs.topk(k, dim=-1).indices  # (L * N, k)
    load = F.one_hot(chosen, E).float().sum(dim=1).mean(dim=0)  # (E,)
    importance = probs.mean(dim=0)  # (E,)
    return E * (load * importance).sum()


def router_stats(router_logits: list[torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Training metrics of the routers, averaged over the MoE layers (tensors: no host sync).

    moe_load_max: the busiest expert's share of the assignments times E (1: balanced,
        E: every token to one expert). moe_load_entropy: entropy of the shares / log E
        (1: balanced, 0: collapsed)."""
    maxes, entropies = [], []
    for logits in router_logits:
        E = logits.shape[-1]
        chosen = logits.detach().topk(k, dim=-1).indices  # top-k of the logits = top-k of the probabilities
        share = torch.bincount(chosen.flatten(), minlength=E).float() / chosen.numel()  # (E,) sums to 1
        maxes.append(share.max() * E)
        entropies.append(-(share * share.clamp(min=1e-12).log()).sum() / math.log(E))
    return {"moe_load_max": torch.stack(maxes).mean(), "moe_load_entropy": torch.stack(entropies).mean()}


def add_balancing_loss(model: nn.Module, loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss + router_aux_loss_coef * load_balancing_loss, metrics) after a training forward
    of ``model``: any module that holds MoE layers (a Transformer, a classifier over one, a
    model with LoRA adapters); (loss, {}) when no MoE layer ran in training mode since the
    last call. The training core (train/core.py) calls it after every task's loss.

    It takes the router logits it uses (each layer's is set back to None): a forward is
    counted once, and the autograd graph the logits belong to is not kept alive after the
    step. The metrics: task_loss (the loss given), moe_aux_loss, and router_stats'."""
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.router_logits is not None]
    if not layers:
        return loss, {}
    router_logits, k, coef = [m.router_logits for m in layers], layers[0].k, layers[0].aux_loss_coef
    for m in layers:
        m.router_logits = None
    aux = load_balancing_loss(router_logits, k)
    metrics = {"task_loss": loss.detach(), "moe_aux_loss": aux.detach(), **router_stats(router_logits, k)}
    return loss + coef * aux, metrics


__all__ = ["MoE", "route", "experts_forward", "load_balancing_loss", "router_stats", "add_balancing_loss"]
