"""Mixture-of-experts feed-forward: token-choice top-k routing over SwiGLU experts.

`MoEFeedForward` is a drop-in replacement for the dense `SwiGLU` of a block, with one extra input:
the modality of every token. Two routing regimes:

- modality-AGNOSTIC (`modality_experts=None`): every token may pick any expert; the experts are free
  to specialise by modality or not, as the router learns (the usual sparse MoE).
- modality-AWARE (`modality_experts=[[0, 1], [2, 3]]`): a token of modality m routes only among the
  experts listed for m (router logits are -inf elsewhere), learned within that group. With one expert
  per modality this is a hard modality split of the FFN; with several it is "MoE within modality".

Router: a linear layer in fp32, softmax over the allowed experts, top-k, gates = the top-k probabilities
renormalised to sum to 1. After every forward the module holds

- `aux_loss`: balance_weight * load-balance loss + router_z_weight * router z-loss (scalar, add it to
  the training loss). The balance loss is Switch-style, E * sum_i f_i * P_i (f_i: share of the top-k
  assignments that went to expert i, P_i: mean router probability of expert i); it is 1 for perfectly
  balanced routing (and for any router whose probabilities are uniform) and up to E / k when collapsed.
  With aware routing it is computed within each modality group (E = that group's size) and averaged
  with the modality's share of tokens as weight, so it never pushes text tokens towards image experts.
- `expert_counts`: (n_modalities, n_experts) long, the top-k assignments each expert received from
  each modality in this forward (valid tokens only): the data behind routing histograms.

Experts are stored stacked, `w_gate_up.weight` (E, D, 2H) and `w_down.weight` (E, H, D), rather than as
E `SwiGLU` modules, so the whole expert computation is two grouped matmuls over tokens sorted by
expert (`F.grouped_mm`: no per-expert Python loop, no host sync, static shapes; compiles with
fullgraph=True in bf16). Where `F.grouped_mm` cannot run (CUDA, fp16/fp64, unaligned widths, fp32 under
torch.compile) a loop over experts with one matmul each takes over; it syncs once for the group sizes
(a graph break under torch.compile, otherwise harmless). The names end in `w_down.weight` so
`init_weights` scales the residual output projection with depth, like the dense FFN's.

Parameter count of one layer (D = d_model, H = hidden, E = n_experts, k = top_k):
    total  = D*E + E * 3*D*H          (router + E SwiGLU experts)
    active = D*E + k * 3*D*H          (what one token uses: router + its k experts)
Forward FLOPs per token: 2 * (D*E + k * 3*D*H).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def moe_param_counts(d_model: int, hidden: int, n_experts: int, top_k: int) -> tuple[int, int]:
    """(total, active per token) parameters of one `MoEFeedForward` layer, without building it."""
    expert = 3 * d_model * hidden  # SwiGLU: gate+up (D x 2H) and down (H x D)
    router = d_model * n_experts
    return router + n_experts * expert, router + top_k * expert


def count_active_params(model: nn.Module) -> int:
    """Parameters one token uses in a forward pass.

    Every submodule that defines `active_params()` (MoEFeedForward, MoTBlock) replaces its own
    parameter count by that number; everything else (embeddings, dense blocks, heads) is counted whole.
    Submodules of such a module are its own business and are not visited again.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive, owned = 0, []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in owned):
            continue
        if callable(getattr(module, "active_params", None)):
            inactive += sum(p.numel() for p in module.parameters()) - module.active_params()
            owned.append(name + ".")
    return total - inactive


class _ExpertWeights(nn.Module):
    """E stacked (in, out) matrices. A module only so that the parameter is named `<attr>.weight`."""

    def __init__(self, n_experts: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_in, d_out))
        bound = 1 / math.sqrt(d_in)  # nn.Linear's default, per expert; init_weights overrides it in a model
        nn.init.uniform_(self.weight, -bound, bound)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # F.grouped_mm is not covered by autocast, so the autocast dtype is applied by hand.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Rows of x grouped by expert (the first counts[0] rows belong to expert 0, ...) times that expert's
    matrix: (A, in) x (E, in, out) -> (A, out).

    impl: "grouped" = one F.grouped_mm call; "loop" = one matmul per expert; "auto" = grouped where it
    is known to work, else loop. Known to work: CPU, fp32 or bf16, rows aligned to 16 bytes; under
    torch.compile bf16 only (the meta kernel rejects fp32, so compiled fp32 takes the loop, which costs
    a graph break at the host sync). The CUDA grouped kernel needs bf16 and aligned group sizes, which
    this code does not arrange, and has not been tested here, so CUDA uses the loop.
    """
    dtype = _compute_dtype(x)
    x, w = x.to(dtype), w.to(dtype)
    if impl == "auto":
        size = x.element_size()
        usable = (torch.bfloat16,) if torch.compiler.is_compiling() else (torch.float32, torch.bfloat16)
        impl = (
            "grouped"
            if hasattr(F, "grouped_mm")
            and x.device.type == "cpu"
            and dtype in usable
            and (w.shape[1] * size) % 16 == 0
            and (w.shape[2] * size) % 16 == 0
            else "loop"
        )
    if impl == "grouped":
        # offs[e] = end row of expert e. contiguous(): the CPU kernel rejects zero-stride (expanded) inputs.
        return F.grouped_mm(x.contiguous(), w, offs=counts.cumsum(0).to(torch.int32))
    if impl != "loop":
        raise ValueError(f"unknown grouped matmul impl {impl!r}")
    parts = x.split(counts.tolist())  # host sync: group sizes are data
    return torch.cat([part @ w[e] for e, part in enumerate(parts)])


class MoEFeedForward(nn.Module):
    def __init__(
        self,
        d_model: int,
        hidden: int,
        n_experts: int,
        top_k: int,
        n_modalities: int = 2,
        modality_experts: list[list[int]] | None = None,
        balance_weight: float = 0.01,
        router_z_weight: float = 0.001,
        impl: str = "auto",  # grouped matmul implementation: auto | grouped | loop (see grouped_matmul)
    ):
        super().__init__()
        if modality_experts is None:
            # Agnostic: one balance group holding every expert, shared by all modalities.
            group_of_modality = [0] * n_modalities
            groups = [list(range(n_experts))]
        else:
            if len(modality_experts) != n_modalities:
                raise ValueError(f"modality_experts needs one expert list per modality ({n_modalities})")
            group_of_modality = list(range(n_modalities))
            groups = [list(g) for g in modality_experts]
        for g in groups:
            if len(set(g)) != len(g) or not all(0 <= e < n_experts for e in g):
                raise ValueError(f"expert group {g} must list distinct experts in [0, {n_experts})")
            if len(g) < top_k:
                raise ValueError(f"top_k={top_k} is larger than the expert group {g}")
        if impl not in ("auto", "grouped", "loop"):
            raise ValueError(f"unknown impl {impl!r}")

        self.d_model, self.hidden = d_model, hidden
        self.n_experts, self.top_k, self.n_modalities = n_experts, top_k, n_modalities
        self.modality_experts = modality_experts
        self.balance_weight, self.router_z_weight = balance_weight, router_z_weight
        self.impl = impl

        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_gate_up = _ExpertWeights(n_experts, d_model, 2 * hidden)  # (E, D, 2H): gate and up in one matmul
        self.w_down = _ExpertWeights(n_experts, hidden, d_model)  # (E, H, D)

        group_experts = torch.zeros(len(groups), n_experts, dtype=torch.bool)  # (G, E)
        for i, g in enumerate(groups):
            group_experts[i, g] = True
        group_of_modality = torch.tensor(group_of_modality, dtype=torch.long)  # (M,)
        self.register_buffer("group_experts", group_experts, persistent=False)
        self.register_buffer("group_of_modality", group_of_modality, persistent=False)
        self.register_buffer("allowed", group_experts[group_of_modality], persistent=False)  # (M, E)

        self.aux_loss = torch.zeros(())
        self.expert_counts = torch.zeros(n_modalities, n_experts, dtype=torch.long)

    def active_params(self) -> int:
        """Parameters one token uses: the router and top_k experts (see the module docstring)."""
        return moe_param_counts(self.d_model, self.hidden, self.n_experts, self.top_k)[1]

    def extra_repr(self) -> str:
        routing = "agnostic" if self.modality_experts is None else f"aware {self.modality_experts}"
        return f"d_model={self.d_model}, hidden={self.hidden}, experts={self.n_experts}, top_k={self.top_k}, {routing}"

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        modality: torch.Tensor | None,  # (B, T) long in [0, n_modalities), padding too; None = all 0
        valid: torch.Tensor | None = None,  # (B, T) bool, False = padding: no stats, no aux loss
    ) -> torch.Tensor:
        """(B, T, D) -> (B, T, D). Padding tokens are still computed (static shapes), but they do not
        count in `expert_counts` or `aux_loss`, and no token's output depends on another's."""
        B, T, D = x.shape
        N, E, k = B * T, self.n_experts, self.top_k
        xf = x.reshape(N, D)
        mod = torch.zeros(N, dtype=torch.long, device=x.device) if modality is None else modality.reshape(N)

        # ---- routing, in fp32: top-k choices should not flip with bf16 rounding ------------------
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(xf.float(), self.router.weight.float())  # (N, E)
        logits = logits.masked_fill(~self.allowed[mod], float("-inf"))  # aware routing: own group only
        probs = logits.softmax(dim=-1)  # (N, E), exactly 0 outside the token's group
        # top-k on logits, not probs: a masked expert (-inf) can never tie with an allowed one whose
        # probability underflowed to 0. softmax over the k chosen logits = renormalised top-k probs.
        top_logits, top_e = logits.topk(k, dim=-1)  # (N, k)
        gates = top_logits.softmax(dim=-1)  # (N, k)

        # ---- dispatch: sort the N*k (token, expert) assignments by expert --------------------------
        flat_e = top_e.reshape(N * k)  # assignment a = n*k + j belongs to token n
        order = flat_e.argsort(stable=True)  # (N*k,) assignments grouped by expert, deterministic
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat_e, torch.ones_like(flat_e))
        # Repeat each token k times, then permute. Same rows as xf[order // k], but the backward is a
        # sum over k plus a permutation, with no duplicate-index scatter-add, so it is deterministic on GPUs too.
        x_sorted = xf.unsqueeze(1).expand(N, k, D).reshape(N * k, D)[order]  # (N*k, D)

        gate, up = grouped_matmul(x_sorted, self.w_gate_up.weight, counts, self.impl).chunk(2, dim=-1)
        y_sorted = grouped_matmul(F.silu(gate) * up, self.w_down.weight, counts, self.impl)  # (N*k, D)
        y = y_sorted[order.argsort()].view(N, k, D)  # back to assignment order (a permutation again)
        out = (y * gates.unsqueeze(-1).to(y.dtype)).sum(dim=1)  # (N, D): gate-weighted sum of k experts

        self._router_stats(logits, probs, top_e, mod, valid)
        return out.view(B, T, D)

    def _router_stats(self, logits, probs, top_e, mod, valid) -> None:
        """Sets self.expert_counts and self.aux_loss. All fp32/integer: outside autocast's reach."""
        N, E, k, M = probs.shape[0], self.n_experts, self.top_k, self.n_modalities
        G = self.group_experts.shape[0]
        v = torch.ones(N, dtype=torch.bool, device=probs.device) if valid is None else valid.reshape(N)
        vf = v.float()

        # Assignment counts per (modality, expert), valid tokens only; integer scatter = exact.
        slot = (mod.unsqueeze(1) * E + top_e).reshape(N * k)  # (N*k,) index into a flat (M, E)
        ones = v.long().repeat_interleave(k)  # each token's k assignments count iff it is valid
        counts_me = torch.zeros(M * E, dtype=torch.long, device=probs.device).scatter_add_(0, slot, ones).view(M, E)
        self.expert_counts = counts_me.detach()

        # Switch load balance within each routing group g: E_g * sum_i f_gi * P_gi, then a token-weighted mean.
        with torch.autocast(probs.device.type, enabled=False):
            counts_ge = torch.zeros(G, E, device=probs.device).index_add_(
                0, self.group_of_modality, counts_me.float()
            )  # (G, E)
            in_group = F.one_hot(self.group_of_modality[mod], G).float() * vf.unsqueeze(1)  # (N, G)
            tokens_g = in_group.sum(0)  # (G,)
            prob_sum_ge = in_group.t() @ probs  # (G, E), differentiable: the balance gradient flows via P
            n_g = tokens_g.clamp(min=1).unsqueeze(1)
            f = counts_ge / (k * n_g)  # share of the group's assignments per expert (sums to 1)
            P = prob_sum_ge / n_g  # mean router probability per expert (sums to 1)
            per_group = self.group_experts.sum(1).float() * (f * P).sum(1)  # (G,) each >= 1 when balanced
            share = tokens_g / tokens_g.sum().clamp(min=1)  # weight groups by their tokens
            balance = (share * per_group).sum()

            # Router z-loss (ST-MoE): keeps router logits small, so softmax stays in its soft regime.
            lse = torch.logsumexp(logits, dim=-1)  # (N,), over the allowed experts only
            z = (lse.pow(2) * vf).sum() / vf.sum().clamp(min=1)

        self.aux_loss = self.balance_weight * balance + self.router_z_weight * z
