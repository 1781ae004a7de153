"""Batched generation with a static KV cache and a per-sequence modality state machine.

Every sequence carries its own state: in text it may emit text, `<boi>` or `<eos>`; after `<boi>`
it may emit only image codes, exactly `tokens_per_image` of them, then `<eoi>` is forced. So an
answer that interleaves text and images is always well formed. Prompts of different lengths are
left-padded; padded slots are masked out of attention and positions start at each prompt's
first real token. Classifier-free guidance runs the unconditional prompts as extra rows of the
same batch and mixes logits only at image positions.

Two speed options: `dtype=torch.bfloat16` casts the weights (and so the KV cache) to bf16, and
`compile=True` runs the one-token decode step through `torch.compile`. The continuous-batching
`Scheduler` (nmm.infer.scheduler) shares an Engine's model, masks and compiled step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmm.infer.sampling import SamplingConfig, apply_repetition_penalty, sample
from nmm.model.model import NativeMultimodalModel

NEG_INF = float("-inf")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per sequence (prompt excluded, <eos> excluded)
    finished: list[bool]


class Engine:
    """Generation over one model. `dtype` casts the model's weights in place (the model is shared, e.g. with
    a Pipeline, so everything using it then runs in that dtype); `compile` wraps the decode step in
    `torch.compile` with dynamic shapes: a growing cache and changing batch sizes reuse one graph (batch size
    1 gets its own: torch.compile specialises size-1 dimensions)."""

    def __init__(self, model: NativeMultimodalModel, device: torch.device | str = "cpu",
                 dtype: torch.dtype | str | None = None, compile: bool = False):
        dtype = resolve_dtype(dtype)
        if dtype is not None:
            model.to(dtype)
        self.model = model.eval()
        self.vocab = model.vocab
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.compiled = compile
        V, v = self.vocab.size, self.vocab
        self.text_allowed = torch.zeros(V, dtype=torch.bool, device=self.device)
        self.text_allowed[: v.n_text] = True
        self.text_allowed[[v.eos, v.boi]] = True
        self.image_allowed = torch.zeros(V, dtype=torch.bool, device=self.device)
        self.image_allowed[v.image_start :] = True
        # Prefill stays eager: it runs once per request, with ever different shapes.
        self.decode_step = torch.compile(self._decode_step, dynamic=True) if compile else self._decode_step

    @staticmethod
    def static_dims(tensor: torch.Tensor, dims) -> None:
        """Tell torch.compile these dims never change. Under dynamic=True every dim is symbolic, and two that
        happen to be equal when first compiled (say a batch of 2 and 2 KV heads) get tied together, so a
        later batch size would recompile."""
        torch._dynamo.mark_static(tensor, list(dims))

    def _decode_step(self, ids, positions, mask, caches, start: int) -> torch.Tensor:
        """One token per row (B, 1) against the KV cache -> hidden states (B, 1, D)."""
        # Keywords: model.hidden() may gain optional arguments.
        return self.model.hidden(ids, positions=positions, mask=mask, caches=caches, start=start)

    def _allowed(self, in_image: torch.Tensor, remaining: torch.Tensor, allow_images: bool, allow_eos: bool):
        """(B,) state -> (B, V) bool mask of ids each sequence may emit next."""
        v = self.vocab
        text = self.text_allowed.clone()
        if not allow_images:
            text[v.boi] = False
        if not allow_eos:
            text[v.eos] = False
        eoi_only = torch.zeros_like(text)
        eoi_only[v.eoi] = True
        allowed = torch.where(in_image.unsqueeze(1), self.image_allowed.unsqueeze(0), text.unsqueeze(0))
        return torch.where((in_image & (remaining == 0)).unsqueeze(1), eoi_only.unsqueeze(0), allowed)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        uncond_prompts: list[list[int]] | None = None,
        allow_images: bool = True,
        stop_after_image: bool = False,
    ) -> GenerationResult:
        v, model = self.vocab, self.model
        n = len(prompts)
        guided = uncond_prompts is not None and sampling.cfg_scale != 1.0
        rows = prompts + (uncond_prompts if guided else [])
        P = max(len(p) for p in rows)
        total = P + max_new_tokens
        if total > model.cfg.max_seq_len:
            raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                             f"of {model.cfg.max_seq_len} tokens")
        B = len(rows)
        ids = torch.full((B, P), v.pad, dtype=torch.long, device=self.device)
        valid = torch.zeros(B, total, dtype=torch.bool, device=self.device)
        for i, p in enumerate(rows):
            ids[i, P - len(p) :] = torch.tensor(p, device=self.device)
            valid[i, P - len(p) :] = True
        positions = (valid[:, :P].long().cumsum(1) - 1).clamp(min=0)  # (B, P)
        next_pos = positions[:, -1] + 1

        # Prefill: causal within the prompt, padded keys hidden (each row still sees itself).
        causal = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()
        mask = (causal & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=self.device)
        caches = model.backbone.make_caches(B, total, self.dtype, self.device)
        if self.compiled:  # heads and head size never change; batch and length vary from call to call
            for cache in caches:
                self.static_dims(cache.k, (1, 3))
                self.static_dims(cache.v, (1, 3))
        h = model.hidden(ids, positions=positions, mask=mask.unsqueeze(1), caches=caches, start=0)[:, -1]  # (B, D)

        # Modality state of each (conditional) row, from the last prompt token.
        last = ids[:n, -1]
        in_image = last == v.boi
        remaining = torch.where(in_image, v.tokens_per_image, 0)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        out = torch.empty(n, 0, dtype=torch.long, device=self.device)
        gen = torch.Generator(device=self.device)
        if sampling.seed is not None:
            gen.manual_seed(sampling.seed)
        else:
            gen.seed()

        for t in range(max_new_tokens):
            logits = model.logits(h).float()  # (B, V)
            if guided:
                cond, uncond = logits[:n], logits[n:]
                mixed = uncond + sampling.cfg_scale * (cond - uncond)
                logits = torch.where(in_image.unsqueeze(1), mixed, cond)
            allowed = self._allowed(in_image, remaining, allow_images, allow_eos=True)
            logits = logits.masked_fill(~allowed, NEG_INF)
            if sampling.repetition_penalty != 1.0 and out.shape[1]:
                text_hist = torch.where(out < v.n_text, out, v.pad)
                logits = torch.where(in_image.unsqueeze(1), logits,
                                     apply_repetition_penalty(logits, text_hist, sampling.repetition_penalty))
            nxt = sample(logits, sampling, gen)
            nxt = torch.where(done, v.pad, nxt)
            out = torch.cat([out, nxt.unsqueeze(1)], dim=1)

            # Advance the state machine.
            closing = in_image & (remaining == 0)  # this token was <eoi>
            remaining = torch.where(in_image & ~closing, remaining - 1, remaining)
            opening = ~in_image & (nxt == v.boi)
            in_image = (in_image & ~closing) | opening
            remaining = torch.where(opening, v.tokens_per_image, remaining)
            done = done | (nxt == v.eos) | (closing & stop_after_image)
            if bool(done.all()):
                break

            step_ids = torch.cat([nxt, nxt[: B - n]]) if guided else nxt  # unconditional rows follow
            slot = P + t
            valid[:, slot] = True
            mask = valid[:, : slot + 1].unsqueeze(1).unsqueeze(1)  # (B, 1, 1, slot+1)
            h = self.decode_step(step_ids.unsqueeze(1), next_pos.unsqueeze(1), mask, caches, slot)[:, -1]
            next_pos = next_pos + 1

        tokens, finished = [], []
        for i in range(n):
            row = out[i].tolist()
            stop = next((j for j, x in enumerate(row) if x == v.eos or x == v.pad), None)
            tokens.append(row if stop is None else row[:stop])
            finished.append(bool(done[i]))
        return GenerationResult(tokens, finished)
