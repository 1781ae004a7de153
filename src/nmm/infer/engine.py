"""Batched generation with a static KV cache and a per-sequence modality state machine.

Every sequence carries its own state: in text it may emit text, `<boi>` or `<eos>`; after `<boi>`
it may emit only image codes, exactly `tokens_per_image` of them, then `<eoi>` is forced. So an
answer that interleaves text and images is always well formed. Models without a head over image
codes (`model.images.emits_codes` False: late and mid fusion, continuous images) are never offered
`<boi>`. Prompts of different lengths are left-padded; padded slots are masked out of attention and
positions start at each prompt's first real token. Classifier-free guidance runs the unconditional
prompts as extra rows of the same batch and mixes logits only at image positions.

Per step, only the head the rows need runs: while every row is in text, the text head alone (image
codes are never allowed there); while every row is inside an image, the image head alone; when the
next token is forced (`<eoi>` after the last code), no head at all. With a factorised image head and
plain greedy or temperature sampling (no top-k / top-p), an image code is chosen factor by factor:
its logit is the sum of the factors' logits, so the joint softmax is the product of the factors'
softmaxes (and CFG mixing and temperature, being linear, apply per factor): the argmax is the
factors' argmaxes and a sample is one independent draw per factor, e.g. 200 + 16 logits instead of
3,200. Top-k and top-p need the joint ranking, so they keep the joint logits. Rows in different
states (free interleaved generation at batch > 1) take the general path: all logits, one mask per
state. The allowed-token masks are built once per engine (additive 0 / -inf rows, one per state).

Two speed options: `dtype=torch.bfloat16` casts the weights (and so the KV cache) to bf16, and
`compile=True` runs the one-token decode step through `torch.compile`; with greedy decoding the
whole step (model, head, mask, argmax) is one compiled function. The continuous-batching
`Scheduler` (nmm.infer.scheduler) shares an Engine's model, masks and compiled decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nmm.infer.sampling import SamplingConfig, apply_repetition_penalty, sample
from nmm.model.heads import ImageHead
from nmm.model.model import NativeMultimodalModel
from nmm.model.transformer import LayerCaches

NEG_INF = float("-inf")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
TEXT, IMAGE, EOI, MIXED = range(4)  # what the rows of a step may emit (MIXED: rows differ)


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


class CannotGenerateImages(ValueError):
    """A prompt asks for an image (ends in `<boi>`) from a model without a head over image codes."""


class _KV:
    """One layer's keys and values, (B, n_kv_heads, max_len, head_dim): `KVCache.update` on a plain object.
    torch.compile takes the buffers of an nn.Module (KVCache) to have fixed shapes, which baked the batch size
    into the compiled step (a new graph for every batch size); plain tensors can keep a dynamic batch."""

    __slots__ = ("k", "v")

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


@dataclass
class _Call:
    """What one `generate` call fixes: the batch, its cache, its settings."""

    n: int  # conditional rows
    B: int  # all rows (n, plus n unconditional ones under CFG)
    P: int  # padded prompt length: slot of the first generated token
    guided: bool
    sampling: SamplingConfig
    greedy: bool
    factored: bool  # image codes factor by factor (see the module docstring)
    penalty: bool
    valid: torch.Tensor  # (B, P + max_new_tokens) bool: filled cache slots
    next_pos: torch.Tensor  # (B,) RoPE position of the next token
    caches: list
    bias_eos: torch.Tensor  # (3, V) additive masks per state, <eos> allowed (min_new_tokens reached)
    bias_no_eos: torch.Tensor  # the same with <eos> disallowed
    min_new_tokens: int
    gen: torch.Generator | None
    history: torch.Tensor | None  # (n, max_new_tokens) text ids generated (pad elsewhere): repetition penalty
    scale: torch.Tensor  # () CFG scale

    def bias(self, t: int) -> torch.Tensor:
        return self.bias_eos if t >= self.min_new_tokens else self.bias_no_eos


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
        self.vocab = v = model.vocab
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.compiled = compile
        V = v.size
        self.emits_codes = bool(model.images.emits_codes)  # else <boi> is never allowed: it could not be followed
        self.text_size = v.text_size  # outputs of the text head: text ids and specials
        head = model.image_head if self.emits_codes else None
        # Factor-by-factor image codes (a head of 2+ factors): exact (the joint grid's argmax) in fp32; in bf16/fp16
        # the joint grid is summed in low precision, whose rounding can break near-ties differently, so those keep
        # the grid, as does a one-factor head (nothing to gain, and its seeded draws stay what they were).
        factored = isinstance(head, ImageHead) and len(head.factors) > 1 and self.dtype == torch.float32
        self.factors = tuple(head.factors) if factored else None
        self.text_allowed = torch.zeros(V, dtype=torch.bool, device=self.device)
        self.text_allowed[: v.n_text] = True
        self.text_allowed[v.eos] = True
        self.text_allowed[v.boi] = self.emits_codes
        self.image_allowed = torch.zeros(V, dtype=torch.bool, device=self.device)
        lo, hi = v.range("image")
        self.image_allowed[lo:hi] = True
        self._biases: dict[tuple[bool, bool], torch.Tensor] = {}
        # Prefill stays eager: it runs once per request, with ever different shapes.
        self.decode_step = self._compile(self._decode_step) if compile else self._decode_step
        self._fused = {}  # compiled whole greedy steps, by mode

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

    # ---- masks ----------------------------------------------------------------------------------
    def bias_table(self, allow_images: bool = True, allow_eos: bool = True) -> torch.Tensor:
        """(3, V) float: 0 where an id is allowed, -inf where not, one row per state (TEXT, IMAGE, EOI).
        Built once per setting; a step adds one row per sequence to its logits (x + 0 == x exactly)."""
        key = (bool(allow_images), bool(allow_eos))
        if key not in self._biases:
            v = self.vocab
            text = self.text_allowed.clone()
            text[v.boi] = bool(text[v.boi]) and allow_images
            text[v.eos] = allow_eos
            eoi = torch.zeros_like(text)
            eoi[v.eoi] = True
            allowed = torch.stack([text, self.image_allowed, eoi])
            self._biases[key] = torch.zeros(allowed.shape, device=self.device).masked_fill_(~allowed, NEG_INF)
        return self._biases[key]

    # ---- heads: logits -> next ids --------------------------------------------------------------
    def text_greedy(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(k, D) hidden, (S,) or (k, S) text bias -> (k,) argmax over the text head only."""
        return (self.model.text_head(h).float() + bias).argmax(-1)

    def factor_logits(self, h: torch.Tensor, n: int, scale: torch.Tensor | float | None) -> list[torch.Tensor]:
        """Per-factor image logits of rows h[:n], CFG-mixed against rows h[n:] when `scale` is given
        (uncond + scale * (cond - uncond), per factor: the mixing is linear, so summing mixed factor
        logits gives the mixed joint logits). scale: () or (n, 1)."""
        parts = [p.float() for p in self.model.image_head.factor_logits(h)]
        if scale is None:
            return parts
        return [p[n:] + scale * (p[:n] - p[n:]) for p in parts]

    def combine_factors(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Per-factor indices (most significant first) -> vocabulary ids of the image codes."""
        code = indices[0]
        for f, i in zip(self.factors[1:], indices[1:]):
            code = code * f + i
        return self.vocab.ids("image", code)

    def image_greedy(self, h: torch.Tensor, n: int, scale) -> torch.Tensor:
        """The joint argmax over image codes, as the factors' argmaxes."""
        return self.combine_factors([p.argmax(-1) for p in self.factor_logits(h, n, scale)])

    def _pick(self, h: torch.Tensor, mode: int, c: _Call, t: int, state: list[int]) -> torch.Tensor:
        """Hidden states (B, D) of the step's rows -> (n,) next ids of the conditional rows. Same ids (greedy)
        and same distributions (sampling) as all logits + mask + `sample`; see the module docstring."""
        n, v, s = c.n, self.vocab, c.sampling
        S, V = self.text_size, v.size
        if mode == TEXT:
            logits = self.model.text_head(h[:n]).float() + c.bias(t)[TEXT, :S]
            if c.penalty and t:
                logits = apply_repetition_penalty(logits, c.history[:, :t], s.repetition_penalty)
            if c.greedy:
                return logits.argmax(-1)
            # Sampled over the whole vocabulary (the image codes at -inf): torch.multinomial's random draws
            # depend on the row length, so this keeps a seed's tokens what they were with all logits.
            return sample(F.pad(logits, (0, V - S), value=NEG_INF), s, c.gen)
        if mode == IMAGE and c.factored:
            parts = self.factor_logits(h, n, c.scale if c.guided else None)
            if c.greedy:
                return self.combine_factors([p.argmax(-1) for p in parts])
            return self.combine_factors([torch.multinomial((p / s.temperature).softmax(-1), 1, generator=c.gen)
                                         .squeeze(-1) for p in parts])
        if mode == IMAGE:  # the joint grid: top-k / top-p, an unfactorised head or low precision
            logits = self.model.images.logits(h).float()
            if c.guided:
                logits = logits[n:] + c.scale * (logits[:n] - logits[n:])
            if c.greedy:
                return v.ids("image", logits.argmax(-1))
            return sample(F.pad(logits, (V - logits.shape[1], 0), value=NEG_INF), s, c.gen)
        if mode == EOI and (c.greedy or c.factored):
            return torch.full((n,), v.eoi, dtype=torch.long, device=self.device)
        # General: rows in different states (or <eoi> under joint sampling, whose draw keeps a seed's stream).
        logits = self.model.logits(h).float()
        in_image = torch.tensor([x != TEXT for x in state], device=self.device)
        if c.guided:
            cond, uncond = logits[:n], logits[n:]
            mixed = uncond + c.scale * (cond - uncond)
            logits = torch.where(in_image.unsqueeze(1), mixed, cond)
        logits = logits + c.bias(t)[torch.tensor(state, device=self.device)]
        if c.penalty and t:
            logits = torch.where(in_image.unsqueeze(1), logits,
                                 apply_repetition_penalty(logits, c.history[:, :t], s.repetition_penalty))
        return sample(logits, s, c.gen)

    # ---- compiled whole steps -------------------------------------------------------------------
    def _fused_step(self, mode: int):
        """torch.compile of decode step + head + argmax (greedy, every row in `mode`): one call per token."""
        if mode not in self._fused:
            if mode == TEXT:
                def step(ids, positions, mask, caches, start, n, bias):
                    h = self._decode_step(ids, positions, mask, caches, start)[:n, -1]
                    return self.text_greedy(h, bias)
            else:
                def step(ids, positions, mask, caches, start, n, scale):
                    return self.image_greedy(self._decode_step(ids, positions, mask, caches, start)[:, -1], n, scale)
            self._fused[mode] = self._compile(step)
        return self._fused[mode]

    def _forward_pick(self, c: _Call, feed: torch.Tensor, t: int, mode: int, state: list[int]):
        """Feed the tokens of step t-1 (B,), then choose the n tokens of step t."""
        slot = c.P + t - 1
        c.valid[:, slot] = True
        mask = c.valid[:, : slot + 1].view(c.B, 1, 1, slot + 1)
        ids, positions = feed.unsqueeze(1), c.next_pos.unsqueeze(1)
        c.next_pos = c.next_pos + 1
        if self.compiled and c.greedy and (mode == TEXT and not c.penalty or mode == IMAGE and c.factored):
            extra = c.bias(t)[TEXT, : self.text_size] if mode == TEXT else (c.scale if c.guided else None)
            return self._fused_step(mode)(ids, positions, mask, c.caches, slot, c.n, extra)
        h = self.decode_step(ids, positions, mask, c.caches, slot)[:, -1]
        return self._pick(h, mode, c, t, state)

    # ---- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        uncond_prompts: list[list[int]] | None = None,
        allow_images: bool = True,
        stop_after_image: bool = False,
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` per prompt. `<eos>` may not be chosen before `min_new_tokens` tokens,
        nor ever with `ignore_eos` (then every sequence runs `max_new_tokens` steps unless an image ends it
        under `stop_after_image`): fixed-length decoding, as benchmarks need."""
        v, model, N = self.vocab, self.model, self.vocab.tokens_per_image
        n = len(prompts)
        guided = uncond_prompts is not None and sampling.cfg_scale != 1.0
        rows = prompts + (uncond_prompts if guided else [])
        P = max(len(p) for p in rows)
        total = P + max_new_tokens
        if total > model.cfg.max_seq_len:
            raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                             f"of {model.cfg.max_seq_len} tokens")
        if not self.emits_codes and any(p[-1] == v.boi for p in prompts):
            raise CannotGenerateImages(
                f"this model ({model.cfg.variant}) cannot generate images token by token: it has no head over "
                "image codes (continuous images are sampled by Pipeline.generate_images)")
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
        cfg = model.cfg
        caches = LayerCaches(_KV(B, cfg.n_kv_heads, total, cfg.d_model // cfg.n_heads, self.dtype, self.device)
                             for _ in range(cfg.n_layers))
        if self.compiled:  # heads and head size never change; batch and length vary from call to call
            for cache in caches:
                for buf in (cache.k, cache.v):
                    self.static_dims(buf, (1, 3))
                    torch._dynamo.maybe_mark_dynamic(buf, 0)
        h = model.hidden(ids, positions=positions, mask=mask.unsqueeze(1), caches=caches, start=0)[:, -1]  # (B, D)

        greedy = sampling.temperature <= 0
        gen = None
        if not greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sampling.seed) if sampling.seed is not None else gen.seed()
        penalty = sampling.repetition_penalty != 1.0
        allow_boi = allow_images and self.emits_codes
        c = _Call(
            n=n, B=B, P=P, guided=guided, sampling=sampling, greedy=greedy,
            factored=self.factors is not None and sampling.top_k is None
            and (sampling.top_p is None or sampling.top_p >= 1.0),
            penalty=penalty, valid=valid, next_pos=positions[:, -1] + 1, caches=caches,
            bias_eos=self.bias_table(allow_boi, not ignore_eos), bias_no_eos=self.bias_table(allow_boi, False),
            min_new_tokens=max_new_tokens if ignore_eos else min_new_tokens, gen=gen,
            history=torch.full((n, max_new_tokens), v.pad, dtype=torch.long, device=self.device) if penalty else None,
            scale=torch.tensor(float(sampling.cfg_scale), device=self.device),
        )

        # Modality state of each (conditional) row, kept on the host: the step reads its tokens anyway.
        in_image = [p[-1] == v.boi for p in prompts]
        remaining = [N if x else 0 for x in in_image]  # image codes still to come
        done = [False] * n
        done_mask: torch.Tensor | None = None  # (n,) on the device once some row is done: it is fed <pad>
        out: list[list[int]] = [[] for _ in range(n)]

        state = [(IMAGE if r else EOI) if x else TEXT for x, r in zip(in_image, remaining)]
        mode = _mode(state, done)
        nxt = self._pick(h, mode, c, 0, state)
        for t in range(max_new_tokens):
            if done_mask is not None:
                nxt = torch.where(done_mask, v.pad, nxt)
            if penalty:
                c.history[:, t] = torch.where(nxt < v.n_text, nxt, v.pad)
            newly_done = False
            for i, tok in enumerate(nxt.tolist()):  # the step's one device -> host sync
                if done[i]:
                    continue
                out[i].append(tok)
                if in_image[i]:
                    if remaining[i] == 0:  # this was <eoi>
                        in_image[i] = False
                        newly_done |= stop_after_image
                        done[i] = stop_after_image
                    else:
                        remaining[i] -= 1
                elif tok == v.boi:
                    in_image[i], remaining[i] = True, N
                elif tok == v.eos:
                    done[i] = newly_done = True
            if all(done) or t == max_new_tokens - 1:
                break
            if newly_done:
                done_mask = torch.tensor(done, device=self.device)
            state = [(IMAGE if r else EOI) if x else TEXT for x, r in zip(in_image, remaining)]
            mode = _mode(state, done)
            if mode == EOI and (c.greedy or c.factored) and (stop_after_image or t + 1 == max_new_tokens - 1):
                # The next token is <eoi> whatever the model says, and nothing follows it: no forward pass.
                nxt = torch.full((n,), v.eoi, dtype=torch.long, device=self.device)
                continue
            feed = torch.cat([nxt, nxt]) if guided else nxt  # unconditional rows are fed the same tokens
            nxt = self._forward_pick(c, feed, t + 1, mode, state)

        tokens = [row[: row.index(v.eos)] if v.eos in row else row for row in out]
        return GenerationResult(tokens, [bool(d) for d in done])


def _mode(state: list[int], done: list[bool]) -> int:
    """The one state all running rows share, or MIXED. Finished rows fit any: their tokens are replaced by <pad>."""
    modes = {s for s, d in zip(state, done) if not d}
    return modes.pop() if len(modes) == 1 else (MIXED if modes else TEXT)
