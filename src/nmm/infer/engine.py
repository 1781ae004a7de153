"""Batched generation of a fixed batch: a KV cache, the decoding state machine, per-phase heads.

Every sequence carries its own state (`nmm.infer.decoding`): in text it may emit text, `<boi>` or
`<eos>`; after `<boi>` it may emit only image codes, exactly `tokens_per_image` of them, then `<eoi>`
is forced. So an answer that interleaves text and images is always well formed. Models without a head
over image codes (`model.images.emits_codes` False: late and mid fusion, continuous images) are never
offered `<boi>`. Prompts of different lengths are left-padded; padded slots are masked out of attention
and positions start at each prompt's first real token, and every row writes its next token at the same
cache column. Classifier-free guidance runs the unconditional prompts as extra rows of the same batch
and mixes logits only at image positions.

Per step, rows run only the head their phase needs (`nmm.infer.picker`: the text head, the image
head factor by factor, or none for a forced `<eoi>`), and sample with `nmm.infer.sampling` (each row
its uniforms, drawn up front from the call's seed). The continuous-batching `Scheduler`
(nmm.infer.scheduler) shares an Engine's model, state machine, heads, sampler, cache class and
compiled decode step; greedy decoding gives the same tokens in both.

Two speed options: `dtype=torch.bfloat16` casts the weights (and so the KV cache) to bf16, and
`compile=True` runs the one-token decode step through `torch.compile`; with greedy decoding the
whole step (model, head, mask, argmax) is one compiled function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmm.infer.cache import RowCache
from nmm.infer.decoding import CLOSED, EOS, NEG_INF, TEXT, CannotGenerate, Decoder
from nmm.infer.picker import Picker, Plan, Row, code_interfaces
from nmm.infer.sampling import SamplingConfig, SamplingRows, draw_uniforms, record_text
from nmm.model.model import NativeMultimodalModel

__all__ = ["DTYPES", "NEG_INF", "CannotGenerate", "Engine", "GenerationResult", "resolve_dtype"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

CONTINUOUS_HINT = " (continuous images are sampled by Pipeline.generate_images)"


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


@dataclass
class _Call:
    """What one `generate` call fixes: its rows, their cache and their sampling settings."""

    n: int  # conditional rows
    B: int  # all rows (n, plus n unconditional ones under CFG)
    P: int  # padded prompt length: slot of the first generated token
    valid: torch.Tensor  # (B, P + max_new_tokens) bool: filled cache slots
    next_pos: torch.Tensor  # (B,) RoPE position of the next token
    caches: list
    settings: SamplingRows


class Engine:
    """Generation over one model. `dtype` casts the model's weights in place (the model is shared, e.g. with
    a Pipeline, so everything using it then runs in that dtype); `compile` wraps the decode step in
    `torch.compile` (dynamic shapes, inductor's C++ wrapper): a growing cache and changing batch sizes reuse
    one graph (batch size 1 gets its own: torch.compile specialises size-1 dimensions). With greedy decoding
    `generate` compiles the whole step instead (model, head, mask, argmax: `_fused_step`), one graph for text
    and one for images; the Scheduler uses `decode_step`."""

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
        emits = tuple(code_interfaces(model))  # the modalities with a code head: the others' begin is never allowed
        self.emits_codes = "image" in emits  # (late and mid fusion, continuous images: no head over image codes)
        self.text_size = self.vocab.text_size  # outputs of the text head: text ids and specials
        self.decoder = Decoder(self.vocab, emits=emits, device=self.device)
        self.picker = Picker(model, self.decoder, table=self.decoder.table)
        # Prefill stays eager: it runs once per request, with ever different shapes.
        self.decode_step = self._compile(self._decode_step) if compile else self._decode_step
        self._fused = {}  # compiled whole greedy steps, by kind

    @property
    def factors(self) -> tuple[int, ...] | None:
        """The image head's factors when codes are chosen factor by factor, else None (the joint grid)."""
        return self.picker.factors

    @factors.setter
    def factors(self, value: tuple[int, ...] | None) -> None:
        self.picker.factors = value

    @staticmethod
    def _compile(fn):
        """torch.compile with dynamic shapes and inductor's C++ wrapper: at this size a step is a few dozen small
        kernels, and calling them from C++ instead of a Python wrapper halved the compiled step on a CPU."""
        return torch.compile(fn, dynamic=True, options={"cpp_wrapper": True})

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

    def check_prompt(self, prompt: list[int]):
        """The decoding state a prompt leaves; CannotGenerate if it opens an image this model cannot write."""
        return self.decoder.check_prompt(prompt, f"this model ({self.model.cfg.variant})", CONTINUOUS_HINT)

    # ---- compiled whole steps -------------------------------------------------------------------
    def _fused_step(self, kind: str):
        """torch.compile of decode step + head + argmax (greedy, every row in one group: "text" or a modality's
        codes): one call per token."""
        if kind not in self._fused:
            picker = self.picker
            if kind == "text":
                def step(ids, positions, mask, caches, start, n, bias):
                    h = self._decode_step(ids, positions, mask, caches, start)[:n, -1]
                    return picker.text_greedy(h, bias)
            else:
                greedy = picker.greedy_codes(kind)

                def step(ids, positions, mask, caches, start, n, scale):
                    return greedy(self._decode_step(ids, positions, mask, caches, start)[:, -1], n, scale)
            self._fused[kind] = self._compile(step)
        return self._fused[kind]

    def _forward_pick(self, c: _Call, feed: torch.Tensor, t: int, plan: Plan) -> torch.Tensor:
        """Feed the tokens of step t-1 (B,), then choose the n tokens of step t."""
        slot = c.P + t - 1
        c.valid[:, slot] = True
        mask = c.valid[:, : slot + 1].view(c.B, 1, 1, slot + 1)
        ids, positions = feed.unsqueeze(1), c.next_pos.unsqueeze(1)
        c.next_pos = c.next_pos + 1
        fused = plan.fused if self.compiled else None
        if fused == "text":
            return self._fused_step(fused)(ids, positions, mask, c.caches, slot, c.n, plan.text[1])
        if fused is not None:
            return self._fused_step(fused)(ids, positions, mask, c.caches, slot, c.n, plan.codes[0].scale)
        h = self.decode_step(ids, positions, mask, c.caches, slot)[:, -1]
        return self.picker.pick(h, plan, c.settings, c.settings.uniforms[:, t] if plan.sampled else None)

    # ---- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        uncond_prompts: list[list[int]] | None = None,
        allow_images=True,
        stop_after_image: bool = False,
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` per prompt. `allow_images`: may the answers open images (True,
        False, or the names of the modalities they may open). `<eos>` may not be chosen before `min_new_tokens`
        tokens, nor ever with `ignore_eos` (then every sequence runs `max_new_tokens` steps unless an image ends
        it under `stop_after_image`): fixed-length decoding, as benchmarks need. A sampled call draws every
        row's uniforms from `sampling.seed` up front (row i, step t: the [i, t] draw of `torch.rand(n, steps)`)."""
        v, model, dec = self.vocab, self.model, self.decoder
        n = len(prompts)
        guided = uncond_prompts is not None and sampling.cfg_scale != 1.0
        rows = prompts + (uncond_prompts if guided else [])
        P = max(len(p) for p in rows)
        total = P + max_new_tokens
        if total > model.cfg.max_seq_len:
            raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                             f"of {model.cfg.max_seq_len} tokens")
        states = [self.check_prompt(p) for p in prompts]
        if max_new_tokens < 1:
            return GenerationResult([[] for _ in prompts], [False] * n)
        B = len(rows)
        ids = torch.full((B, P), v.pad, dtype=torch.long, device=self.device)
        valid = torch.zeros(B, total, dtype=torch.bool, device=self.device)
        for i, p in enumerate(rows):
            ids[i, P - len(p) :] = torch.tensor(p, device=self.device)
            valid[i, P - len(p) :] = True
        positions = (valid[:, :P].long().cumsum(1) - 1).clamp(min=0)  # (B, P)

        # Prefill: causal within the prompt, padded keys hidden (each row still sees itself).
        causal = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()
        mask = (causal & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=self.device)
        caches = RowCache.layers(model.cfg, B, total, self.dtype, self.device)
        if self.compiled:  # heads and head size never change; batch and length vary from call to call
            for cache in caches:
                for buf in (cache.k, cache.v):
                    self.static_dims(buf, (1, 3))
                    torch._dynamo.maybe_mark_dynamic(buf, 0)
        h = model.hidden(ids, positions=positions, mask=mask.unsqueeze(1), caches=caches, start=0)[:, -1]  # (B, D)

        penalty = sampling.repetition_penalty != 1.0
        settings = SamplingRows(n, max_new_tokens, v.size, self.device, penalty=penalty)
        settings.set(slice(0, n), sampling, draw_uniforms(sampling, n, max_new_tokens))
        c = _Call(n=n, B=B, P=P, valid=valid, next_pos=positions[:, -1] + 1, caches=caches, settings=settings)
        allow = dec.allow_set(allow_images)
        eos_from = max_new_tokens if ignore_eos else min_new_tokens  # the first step that may choose <eos>
        done = [False] * n
        done_mask: torch.Tensor | None = None  # (n,) on the device once some row is done: it is fed <pad>

        def plan(t: int) -> Plan:
            # Finished rows join the group of the running ones (their ids are replaced by <pad>).
            live = {s.phase for s, d in zip(states, done) if not d}
            shared = live.pop() if len(live) == 1 else TEXT
            return self.picker.plan([Row(i, shared if d else s.phase, sampling, allow, t >= eos_from,
                                         i + n if guided else -1) for i, (s, d) in enumerate(zip(states, done))], n)

        out: list[list[int]] = [[] for _ in range(n)]
        step = plan(0)
        nxt = self.picker.pick(h, step, settings, settings.uniforms[:, 0] if step.sampled else None)
        advance = dec.advance
        for t in range(max_new_tokens):
            if done_mask is not None:
                nxt = torch.where(done_mask, v.pad, nxt)
            if penalty:
                record_text(settings.seen, nxt, v.n_text)
            replan, newly_done = t + 1 == eos_from, False
            for i, tok in enumerate(nxt.tolist()):  # the step's one device -> host sync
                if done[i]:
                    continue
                out[i].append(tok)
                flags = advance(states[i], tok)
                if flags:
                    replan = True
                    if flags & EOS or (flags & CLOSED and stop_after_image):
                        done[i] = newly_done = True
            if all(done) or t == max_new_tokens - 1:
                break
            if newly_done:
                done_mask = torch.tensor(done, device=self.device)
            if replan:
                step = plan(t + 1)
            if step.all_forced is not None and (stop_after_image or t + 1 == max_new_tokens - 1):
                # The next token is forced (<eoi>) whatever the model says, and nothing follows it: no forward pass.
                nxt = torch.full((n,), step.all_forced, dtype=torch.long, device=self.device)
                continue
            feed = torch.cat([nxt, nxt]) if guided else nxt  # unconditional rows are fed the same tokens
            nxt = self._forward_pick(c, feed, t + 1, step)

        tokens = [row[: row.index(v.eos)] if v.eos in row else row for row in out]
        return GenerationResult(tokens, [bool(d) for d in done])
