"""The Scheduler's running batch: rows of KV cache, who owns them, and one decode step over them all.

- **Rows.** A static KV cache of `rows` sequences, each `max_len` tokens long (`RowCache`): memory is
  capped at rows x max_len tokens, allocated once. A request takes one row, or two with classifier-free
  guidance (its unconditional prompt runs in a companion row that is fed the request's own tokens, as
  the extra rows of `Engine.generate` are). The rows in use are always 0..used-1: a request that
  leaves frees its rows at once, and the last rows move into the hole, so a step computes exactly the
  rows in use.
- **Prefill.** Requests admitted at the same step are prefilled together (right-padded), each prompt
  written into its own rows of the cache from column 0; RoPE positions start at 0 in every row.
- **Decode.** Every step, all rows in use go through the model together, one token per row, each
  written at its row's own next column; a per-row attention mask hides the columns a row has not
  filled. Then logits -> tokens runs batched, with per-row settings and random streams, through the
  Engine's `Picker` (each row the head its decoding phase needs) and each request's own decoding
  state (`nmm.infer.decoding`) moves on; the plan of heads is rebuilt only when a phase changes or
  rows come and go.
- **Mid fusion.** Its text reads the prompt's images through cross-attention to features computed at
  prefill. `model.hidden` keeps those on the caches object; each row keeps its own, and the running
  rows' features (padded into one batch) go to every decode step.
"""

from __future__ import annotations

import torch

from nmm.infer.cache import RowCache
from nmm.infer.decoding import CLOSED, EOS, SeqState
from nmm.infer.picker import Row
from nmm.infer.requests import Handle
from nmm.infer.sampling import SamplingRows, draw_uniforms, record_text


class Seq:
    """A queued or running request: its handle, its rows, and host-side counters (read without a device sync)."""

    def __init__(self, handle: Handle, allow: frozenset):
        self.handle, self.request = handle, handle.request
        self.row = -1  # its (conditional) row
        self.companion = -1  # the unconditional row under CFG, else -1
        self.length = len(self.request.prompt)  # filled cache columns of its row(s), the longer if two
        if self.request.guided:
            self.length = max(self.length, len(self.request.uncond_prompt))
        self.generated = 0
        self.allow = allow  # the modalities it may open
        self.state = SeqState()  # its decoding state, from its prompt at prefill
        self.memory: list | None = None  # mid fusion: (features, slot, valid) of its row and of its companion


class Batch:
    """The rows of a Scheduler (see the module docstring). Only the scheduler's loop thread calls its methods;
    `used` and `seqs` may be read from other threads."""

    def __init__(self, engine, rows: int, max_len: int):
        self.engine, self.model, self.vocab = engine, engine.model, engine.vocab
        self.device, self.rows, self.max_len = engine.device, rows, max_len
        self.seqs: list[Seq] = []  # running requests
        self.owner: list[Seq | None] = [None] * rows  # which request each row belongs to
        self.used = 0  # rows in use: always rows 0..used-1
        self.steps = 0  # decode steps run
        self._ready = False
        self._plan_dirty = self._memory_dirty = True
        self._memory_fed = -1
        # Mid fusion keeps each row's features (of its images, or its audio) for cross-attention.
        self._mid = any(i.fusion == "mid" for i in self.model.modalities.values())

    # ---- rows --------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return self.rows - self.used

    def admit(self, seq: Seq) -> None:
        """Give a request the next free rows (the caller checked there are enough)."""
        need = seq.request.rows
        seq.row = self.used
        seq.companion = self.used + 1 if need == 2 else -1
        for r in range(self.used, self.used + need):
            self.owner[r] = seq
        self.used += need
        self.seqs.append(seq)

    def release(self, seq: Seq) -> None:
        """Free a request's rows, moving the last rows into the holes so rows 0..used-1 stay in use."""
        self.seqs.remove(seq)
        self.changed()
        for row in sorted((r for r in (seq.row, seq.companion) if r >= 0), reverse=True):
            last = self.used - 1
            if row != last:
                self._move(last, row)
            self.owner[last] = None
            self.used -= 1

    def clear(self) -> list[Seq]:
        """Drop every running request (after a failure); returns them."""
        seqs, self.seqs, self.owner, self.used = self.seqs, [], [None] * self.rows, 0
        self.changed()
        return seqs

    def _move(self, src: int, dst: int) -> None:
        for t in self._row_tensors:
            t[dst] = t[src]
        for cache in self._caches:
            cache.move(src, dst)
        for start in self._caches.item_start.values():  # M-RoPE: where the row's open item began
            start[dst] = start[src]
        owner = self.owner[src]
        self.owner[dst] = owner
        if owner.row == src:
            owner.row = dst
        else:
            owner.companion = dst
        self.changed()

    def changed(self) -> None:
        """The batch changed (rows joined, left or moved): rebuild what depends on it before the next step."""
        self._plan_dirty = self._memory_dirty = True

    # ---- state -------------------------------------------------------------------------------
    def _init(self) -> None:
        """Allocate the cache and the per-row state (on the loop's first work)."""
        cfg, v, R, dev, engine = self.model.cfg, self.vocab, self.rows, self.device, self.engine
        self._caches = RowCache.layers(cfg, R, self.max_len, engine.dtype, dev)
        if engine.compiled:  # the cache never changes shape: only the number of busy rows varies
            for cache in self._caches:
                engine.static_dims(cache.k, range(4))
                engine.static_dims(cache.v, range(4))
        self.hidden = torch.zeros(R, cfg.d_model, dtype=engine.dtype, device=dev)  # last hidden state
        self.length = torch.zeros(R, dtype=torch.long, device=dev)  # filled columns = next RoPE position
        self.next_token = torch.zeros(R, dtype=torch.long, device=dev)
        self.generated = torch.zeros(R, dtype=torch.long, device=dev)
        self.settings = SamplingRows(R, self.max_len, v.size, dev)  # each request's settings and random numbers
        self._row_tensors = [self.hidden, self.length, self.next_token, self.generated, *self.settings.tensors]
        self.changed()
        self._ready = True

    def _plan(self) -> None:
        """Which rows need which head, which are forced, which are CFG companions: rebuilt only when requests
        join, leave or move, or a row's decoding phase (or whether it may end) changes."""
        self.plan = self.engine.picker.plan(
            [Row(seq.row, seq.state.phase, seq.request.sampling, seq.allow, seq.generated >= seq.request.eos_from,
                 seq.companion) for seq in self.seqs], self.used, companions=True)
        self._any_penalty = any(seq.request.sampling.repetition_penalty != 1.0 for seq in self.seqs)
        self._plan_dirty = False

    def _set_memory(self, fed: int) -> None:
        """Mid fusion: the image features each fed row reads through cross-attention, padded into one batch and
        put where model.hidden looks for them between chunks without images (on the caches object)."""
        items = []
        for r in range(fed):
            owner = self.owner[r]
            items.append(None if owner is None else owner.memory[0 if owner.row == r else 1])
        M = max([item[1].shape[0] for item in items if item is not None] + [0])
        D, dev = self.model.cfg.d_model, self.device
        memory = torch.zeros(fed, 1 + M, D, dtype=self.engine.dtype, device=dev)
        slot = torch.zeros(fed, M, dtype=torch.long, device=dev)
        valid = torch.zeros(fed, M, dtype=torch.bool, device=dev)
        for r, item in enumerate(items):
            if item is not None:
                feats, s, ok = item
                memory[r, : feats.shape[0]] = feats
                slot[r, : s.shape[0]] = s
                valid[r, : ok.shape[0]] = ok
        self._caches.memory, self._caches.memory_slot, self._caches.memory_valid = memory, slot, valid
        self._memory_fed, self._memory_dirty = fed, False

    # ---- prefill -----------------------------------------------------------------------------
    def prefill(self, seqs: list[Seq]) -> None:
        """Run the prompts of newly admitted requests (their rows are consecutive, in this order)."""
        if not self._ready:
            self._init()
        v, dev = self.vocab, self.device
        prompts: list[list[int]] = []
        for seq in seqs:
            prompts.append(seq.request.prompt)
            if seq.companion >= 0:
                prompts.append(seq.request.uncond_prompt)
        r0, k, L = seqs[0].row, len(prompts), max(len(p) for p in prompts)
        ids = torch.full((k, L), v.pad, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        ids = ids.to(dev)
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        positions = torch.arange(L, device=dev).expand(k, L)
        # Causal within each prompt, padding keys hidden. Right padding: every query sees at least key 0.
        cols = torch.arange(L, device=dev)
        mask = (cols[None, :] <= cols[:, None])[None] & (cols[None, None, :] < lengths[:, None, None])
        for cache in self._caches:
            cache.rows, cache.write = slice(r0, r0 + k), None
        self._caches.memory = None  # mid fusion: computed from these prompts' images (and kept per row below)
        h = self.model.hidden(ids, positions=positions, mask=mask.unsqueeze(1), caches=self._caches, start=0)
        rows = slice(r0, r0 + k)
        self.hidden[rows] = h[torch.arange(k, device=dev), lengths - 1]
        self.length[rows] = lengths
        self.generated[rows] = 0
        j = 0
        for seq in seqs:
            s = seq.request.sampling
            uniforms = draw_uniforms(s, 1, seq.request.max_new_tokens)  # its own stream, independent of the batch
            self.settings.set(slice(seq.row, seq.row + seq.request.rows), s, None if uniforms is None else uniforms[0])
            seq.state = self.engine.decoder.start(seq.request.prompt)
            if self._caches.memory is not None:  # this request's rows' image features (mid fusion)
                c = self._caches
                seq.memory = [(c.memory[i], c.memory_slot[i], c.memory_valid[i]) for i in range(j, j + seq.request.rows)]
            j += seq.request.rows
        self.changed()

    # ---- one decode step -----------------------------------------------------------------------
    def pick(self) -> list[tuple[Seq, bool]]:
        """Choose every running row's next token, hand the tokens to the handles and move each request's
        decoding state on. Returns the requests that ended, (seq, finished): the caller releases them."""
        n = self.used
        if self._plan_dirty:
            self._plan()
        plan, settings = self.plan, self.settings
        u = settings.uniforms[:n].gather(1, self.generated[:n, None]).squeeze(1) if plan.sampled else None
        nxt = self.engine.picker.pick(self.hidden, plan, settings, u)
        if self._any_penalty:
            record_text(settings.seen[:n], nxt, self.vocab.n_text)
        self.generated[:n] += 1
        self.next_token[:n] = nxt
        tokens = nxt.tolist()  # the one device -> host sync of a step

        advance, ended = self.engine.decoder.advance, []
        for seq in self.seqs:
            tok, handle, request = tokens[seq.row], seq.handle, seq.request
            seq.generated += 1
            flags = advance(seq.state, tok)
            if flags or seq.generated == request.eos_from:
                self._plan_dirty = True
            if flags & EOS:
                ended.append((seq, True))
                continue
            handle.tokens.append(tok)
            if flags & CLOSED and request.stop_after_image:
                ended.append((seq, True))
            elif seq.generated >= request.max_new_tokens:
                ended.append((seq, False))
            else:
                handle.notify()
        self.steps += 1
        return ended

    def feed(self) -> None:
        """Feed the tokens just chosen: rows 0..used-1 (the survivors), each at its own next column."""
        n = self.used
        if n == 0:
            return
        compiled = self.engine.compiled
        # Attend over the columns the longest row has filled (a dynamic size for torch.compile too: attending over
        # whole rows kept shapes static but cost 8.0 ms instead of 5.4-5.8 ms per step at 32 rows on the CPU of
        # docs/performance.md). Compiled, feed at least 2 rows, since torch.compile specialises size-1
        # dimensions; the extra row is a free one, whose cache nothing reads.
        fed = 2 if compiled and n == 1 and self.rows > 1 else n
        kv_len = max(s.length for s in self.seqs) + 1
        length = self.length[:fed]
        cols = torch.arange(kv_len, device=self.device)
        mask = (cols.unsqueeze(0) <= length.unsqueeze(1)).view(fed, 1, 1, -1)
        for cache in self._caches:
            cache.write, cache.kv_len = length, kv_len
        if self._mid and (self._memory_dirty or self._memory_fed != fed):
            self._set_memory(fed)
        h = self.engine.decode_step(self.next_token[:fed, None], length.unsqueeze(1), mask, self._caches, 0)
        self.hidden[:n] = h[:n, -1]
        self.length[:n] += 1
        for seq in self.seqs:
            seq.length += 1
