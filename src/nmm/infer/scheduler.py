"""Continuous batching: requests join and leave one running batch between decode steps.

`Engine.generate` runs a fixed batch from start to end. A server meets requests one by one, at any
time, with different lengths and settings; the `Scheduler` runs them all in one batch instead:

- **Rows.** A static KV cache of `rows` sequences, each `max_len` tokens long: memory is capped at
  rows x max_len tokens, allocated once. A request takes one row, or two with classifier-free guidance
  (its unconditional prompt runs in a companion row that is fed the request's own tokens, as the extra
  rows of `Engine.generate` are). Requests that find no free row wait in a FIFO queue; none is dropped.
- **Prefill.** Requests admitted at the same step are prefilled together (right-padded), each prompt
  written into its own rows of the cache from column 0; RoPE positions start at 0 in every row.
- **Decode.** Every step, all running rows go through the model together, one token per row, each
  written at its row's own next column; a per-row attention mask hides the columns a row has not
  filled. The logits -> token part runs batched too, with per-row settings (temperature, top-k, top-p,
  repetition penalty, CFG scale) and per-request random streams (`sample_rows`), so a seeded request
  gives the same answer whoever else is in the batch.
- **State.** Each row keeps its own modality state as in `Engine` (text -> `<boi>` -> exactly
  `tokens_per_image` codes -> `<eoi>` -> text), its own position and its own stop conditions
  (`<eos>`, `max_new_tokens`, or the end of an image with `stop_after_image`). As in `Engine`, rows
  only run the head they need: the text head for rows in text, the image head for rows inside an
  image (factor by factor for greedy and temperature sampling, the joint grid for top-k / top-p),
  none for a forced `<eoi>`. Models without a head over image codes are never offered `<boi>`, and a
  prompt ending in `<boi>` is refused for them.
- **Mid fusion.** Its text reads the prompt's images through cross-attention to features computed at
  prefill. `model.hidden` keeps those on the caches object; the scheduler keeps each row's own and
  hands the running rows' features (padded into one batch) to every decode step.
- **Leaving.** A finished (or cancelled) request frees its rows at once; the last rows move into the
  hole, so the running rows are always 0..n-1 and a step computes exactly n rows.

Greedy decoding gives token for token what `Engine.generate` gives for the same prompt, alone or in a
busy batch (the same arithmetic, up to float rounding in differently shaped matmuls). Sampling draws
from the same distributions as `Engine`, but by inverse CDF from pre-drawn uniforms, so a seed gives
other tokens than `Engine.generate` with that seed.

One daemon thread runs the loop; `submit` may be called from any thread, and each `Handle` reports
new tokens through an optional callback (the HTTP server uses it to stream).
"""

from __future__ import annotations

import atexit
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nmm.infer.engine import NEG_INF, CannotGenerateImages, Engine
from nmm.infer.sampling import SamplingConfig, sample_rows
from nmm.model.transformer import LayerCaches


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    uncond_prompt: list[int] | None = None  # CFG: the unconditional prompt (used when cfg_scale != 1)
    allow_images: bool = True  # may the answer open an image with <boi>?
    stop_after_image: bool = False  # end at the first <eoi> (image generation)

    @property
    def guided(self) -> bool:
        return self.uncond_prompt is not None and self.sampling.cfg_scale != 1.0

    @property
    def rows(self) -> int:
        return 2 if self.guided else 1


class QueueFull(Exception):
    """More requests would wait than the scheduler's `max_queue` allows."""


class Handle:
    """A submitted request. `tokens` grows as they are generated (prompt excluded, `<eos>` excluded, as in
    `GenerationResult`); `finished` is True when the request ended at `<eos>` (or at `<eoi>` with
    `stop_after_image`), False when `max_new_tokens` ran out or it was cancelled."""

    def __init__(self, request: Request, on_update: Callable[[Handle], None] | None, wake: Callable[[], None]):
        self.request = request
        self.tokens: list[int] = []
        self.finished = False
        self.cancelled = False
        self.error: BaseException | None = None
        self._on_update, self._wake = on_update, wake
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating (the rows are freed at the next step boundary); harmless once done."""
        self.cancelled = True
        self._wake()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> list[int]:
        if not self._done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self.error is not None:
            raise self.error
        return self.tokens

    def _notify(self) -> None:
        if self._on_update is not None:
            try:
                self._on_update(self)
            except Exception:  # a consumer that went away (e.g. a closed event loop) must not stop the batch
                pass

    def _finish(self, finished: bool = False, error: BaseException | None = None) -> None:
        self.finished, self.error = finished, error
        self._done.set()
        self._notify()


class _RowCache:
    """One layer's keys and values for all rows: (rows, n_kv_heads, max_len, head_dim).

    Stands in for `nmm.model.transformer.KVCache`: attention only calls `update(start, k, v)` and attends
    over what it returns, so the scheduler decides here where each row writes and what it reads. Before
    a forward pass the scheduler sets either `rows` (prefill: those rows, written from column `start`)
    or `write` (decode: rows 0..B-1, row i writing its one token at column write[i])."""

    def __init__(self, rows: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(rows, n_kv, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.rows = slice(0, 0)
        self.write: torch.Tensor | None = None
        self.kv_len: int | None = None  # decode: columns to attend over; None = all

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.write is None:  # prefill
            end = start + k.shape[2]
            ck, cv = self.k[self.rows], self.v[self.rows]  # views: writes land in the cache
            ck[:, :, start:end] = k
            cv[:, :, start:end] = v
            return ck[:, :, :end], cv[:, :, :end]
        ck, cv = self.k[: k.shape[0]], self.v[: k.shape[0]]
        index = self.write.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
        ck.scatter_(2, index, k)
        cv.scatter_(2, index, v)
        if self.kv_len is None:
            return ck, cv
        return ck[:, :, : self.kv_len], cv[:, :, : self.kv_len]

    def move(self, src: int, dst: int) -> None:
        self.k[dst] = self.k[src]
        self.v[dst] = self.v[src]


class _Seq:
    """A queued or running request: its handle, its rows, and host-side counters (read without a device sync)."""

    def __init__(self, handle: Handle):
        self.handle, self.request = handle, handle.request
        self.row = -1  # its (conditional) row
        self.companion = -1  # the unconditional row under CFG, else -1
        self.length = len(self.request.prompt)  # filled cache columns of its row(s), the longer if two
        if self.request.guided:
            self.length = max(self.length, len(self.request.uncond_prompt))
        self.generated = 0
        self.in_image = False  # its modality state (host side: the step reads its tokens anyway)
        self.remaining = 0  # image codes still to come
        self.allow_boi = self.request.allow_images
        self.memory: list | None = None  # mid fusion: (features, slot, valid) of its row and of its companion


class Scheduler:
    """Continuous batching over an `Engine`'s model (see the module docstring).

    rows: most sequences decoded together (a CFG request counts 2), capped further by `max_cache_bytes`
    of KV cache; max_len: cache length of a row (default and upper bound: the model's context);
    max_queue: most requests waiting for rows (None = no limit) before `submit` raises `QueueFull`;
    max_prefill_tokens: prompt tokens prefilled per step (at least one request), so a burst of long
    prompts does not stall the running rows for long."""

    def __init__(self, engine: Engine, max_batch: int = 32, max_len: int | None = None,
                 max_cache_bytes: int | None = None, max_queue: int | None = None, max_prefill_tokens: int = 4096):
        cfg = engine.model.cfg
        self.engine, self.model, self.vocab = engine, engine.model, engine.vocab
        self.device = engine.device
        self.max_len = cfg.max_seq_len if max_len is None else min(max_len, cfg.max_seq_len)
        head_dim = cfg.d_model // cfg.n_heads
        itemsize = torch.empty((), dtype=engine.dtype).element_size()
        self.row_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * self.max_len * head_dim * itemsize  # keys + values
        rows = max_batch if max_cache_bytes is None else min(max_batch, max_cache_bytes // self.row_bytes)
        if rows < 1:
            raise ValueError(f"no room for one row: a row of {self.max_len} tokens needs {self.row_bytes} bytes "
                             f"of KV cache (max_batch {max_batch}, max_cache_bytes {max_cache_bytes})")
        self.rows, self.max_queue, self.max_prefill_tokens = rows, max_queue, max_prefill_tokens
        self._lock = threading.Condition()
        self._queue: deque[_Seq] = deque()
        self._seqs: list[_Seq] = []  # running requests
        self._owner: list[_Seq | None] = [None] * rows  # which request each row belongs to
        self._used = 0  # rows in use: always rows 0.._used-1
        self._paused = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._state_ready = False
        self._plan_dirty = self._memory_dirty = True
        self._memory_fed = -1
        # Mid fusion keeps each row's image features between steps (cross-attention memory), set at prefill.
        self._mid = self.model.images.fusion == "mid"
        self.steps = 0  # decode steps run (for metrics)

    # ---- public ------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        """Requests in the batch now."""
        return len(self._seqs)

    @property
    def waiting(self) -> int:
        """Requests queued for rows."""
        return len(self._queue)

    @property
    def rows_in_use(self) -> int:
        return self._used

    def check(self, request: Request) -> None:
        """Raise ValueError if `request` can never run here."""
        v = self.vocab
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        for name, prompt in (("prompt", request.prompt), ("uncond_prompt", request.uncond_prompt)):
            if prompt is None:
                continue
            if not prompt:
                raise ValueError(f"{name} is empty")
            if min(prompt) < 0 or max(prompt) >= v.size:
                raise ValueError(f"{name} has ids outside the vocabulary [0, {v.size})")
            if len(prompt) + request.max_new_tokens > self.max_len:
                raise ValueError(f"{name} ({len(prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                                 f"exceeds the context of {self.max_len} tokens")
        if not self.engine.emits_codes and request.prompt and request.prompt[-1] == v.boi:
            raise CannotGenerateImages(f"this model ({self.model.cfg.variant}) cannot generate images token by token: "
                                       "it has no head over image codes")
        if request.rows > self.rows:
            raise ValueError(f"the request needs {request.rows} rows (CFG); this scheduler has {self.rows}")
        s = request.sampling
        if s.temperature < 0 or (s.top_k is not None and s.top_k < 1) or (s.top_p is not None and not 0 < s.top_p <= 1):
            raise ValueError(f"invalid sampling settings {s}")

    def submit(self, request: Request, on_update: Callable[[Handle], None] | None = None) -> Handle:
        return self.submit_many([request], on_update)[0]

    def submit_many(self, requests: list[Request],
                    on_update: Callable[[Handle], None] | None = None) -> list[Handle]:
        """Queue requests together (all or none): ValueError if one can never run, QueueFull if more than
        `max_queue` requests would then wait for rows. `on_update(handle)` is called on the scheduler's thread
        after each step that gave that handle a token, and when it ends: keep it short (it delays the batch)."""
        for r in requests:
            self.check(r)
        handles = [Handle(r, on_update, self._wake) for r in requests]
        with self._lock:
            if self._stopped:
                raise RuntimeError("the scheduler is closed")
            if self.max_queue is not None:
                would_wait = self._would_wait([s.request.rows for s in self._queue] + [r.rows for r in requests])
                if would_wait > self.max_queue:
                    raise QueueFull(f"{len(self._queue)} requests are waiting for the model and "
                                    f"{len(self._seqs)} running")
            self._queue.extend(_Seq(h) for h in handles)
            self._start()
            self._lock.notify_all()
        return handles

    def generate(self, requests: list[Request], timeout: float | None = None) -> list[Handle]:
        """Submit and wait: a blocking convenience (tests, scripts)."""
        handles = self.submit_many(requests)
        for h in handles:
            h.result(timeout)
        return handles

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def pause(self) -> None:
        """Hold decoding (waiting requests are still admitted and prefilled): for tests and maintenance."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    def close(self, timeout: float | None = 10) -> None:
        """Stop the loop; requests still queued or running end with an error."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # ---- the loop ----------------------------------------------------------------------------
    def _would_wait(self, needs: list[int]) -> int:
        """How many of these queued requests (rows each, in FIFO order) would still wait after admission."""
        free = self.rows - self._used
        for i, need in enumerate(needs):
            if need > free:
                return len(needs) - i
            free -= need
        return 0

    def _start(self) -> None:
        if self._thread is None:  # lazily: an idle scheduler costs no thread and no cache memory
            self._thread = threading.Thread(target=self._loop, name="nmm-scheduler", daemon=True)
            self._thread.start()
            # Stop the loop before the interpreter tears torch down: a daemon thread still inside torch at
            # exit aborts the process ("terminate called without an active exception").
            atexit.register(self.close)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # thread-local
        while True:
            with self._lock:
                if self._stopped:
                    break
                self._drop_cancelled()
                admitted = self._admit()
                decode = bool(self._seqs) and not self._paused
                if not admitted and not decode:  # idle, paused, or the queue's head waits for rows
                    self._lock.wait()  # until a submit, cancel, resume or close
                    continue
            try:
                if admitted:
                    self._prefill(admitted)
                if decode:
                    self._step()
            except Exception as e:  # a bug or an out-of-memory: fail what is running, keep serving
                with self._lock:
                    for seq in self._seqs:
                        seq.handle._finish(error=e)
                    self._seqs, self._owner, self._used = [], [None] * self.rows, 0
                    self._changed()
        with self._lock:
            for seq in [*self._seqs, *self._queue]:
                seq.handle._finish(error=RuntimeError("the scheduler was closed"))
            self._seqs, self._queue = [], deque()

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._queue if s.handle.cancelled]:
            self._queue.remove(seq)
            seq.handle._finish()
        for seq in [s for s in self._seqs if s.handle.cancelled]:
            self._release(seq)
            seq.handle._finish()

    def _admit(self) -> list[_Seq]:
        """Move queued requests (FIFO, no overtaking) into free rows, up to the prefill budget."""
        admitted, tokens = [], 0
        while self._queue:
            seq = self._queue[0]
            need = seq.request.rows
            prompt_tokens = len(seq.request.prompt) + (len(seq.request.uncond_prompt) if need == 2 else 0)
            if need > self.rows - self._used or (admitted and tokens + prompt_tokens > self.max_prefill_tokens):
                break
            self._queue.popleft()
            seq.row = self._used
            seq.companion = self._used + 1 if need == 2 else -1
            for r in range(self._used, self._used + need):
                self._owner[r] = seq
            self._used += need
            self._seqs.append(seq)
            admitted.append(seq)
            tokens += prompt_tokens
        return admitted

    def _release(self, seq: _Seq) -> None:
        """Free a request's rows, moving the last rows into the holes so rows 0..used-1 stay in use."""
        self._seqs.remove(seq)
        self._changed()
        for row in sorted((r for r in (seq.row, seq.companion) if r >= 0), reverse=True):
            last = self._used - 1
            if row != last:
                self._move(last, row)
            self._owner[last] = None
            self._used -= 1

    def _move(self, src: int, dst: int) -> None:
        for t in self._row_tensors:
            t[dst] = t[src]
        for cache in self._caches:
            cache.move(src, dst)
        owner = self._owner[src]
        self._owner[dst] = owner
        if owner.row == src:
            owner.row = dst
        else:
            owner.companion = dst
        self._changed()

    # ---- state -------------------------------------------------------------------------------
    def _changed(self) -> None:
        """The batch changed (rows joined, left or moved): rebuild what depends on it before the next step."""
        self._plan_dirty = self._memory_dirty = True

    def _init_state(self) -> None:
        """Allocate the cache and the per-row state (on the loop's first work)."""
        cfg, v, R, dev = self.model.cfg, self.vocab, self.rows, self.device
        # LayerCaches: a list that can also hold mid fusion's image features, as model.hidden expects.
        self._caches = LayerCaches(_RowCache(R, cfg.n_kv_heads, self.max_len, cfg.d_model // cfg.n_heads,
                                             self.engine.dtype, dev) for _ in range(cfg.n_layers))
        if self.engine.compiled:  # the cache never changes shape: only the number of busy rows varies
            for cache in self._caches:
                self.engine.static_dims(cache.k, range(4))
                self.engine.static_dims(cache.v, range(4))
        self.hidden = torch.zeros(R, cfg.d_model, dtype=self.engine.dtype, device=dev)  # last hidden state
        self.length = torch.zeros(R, dtype=torch.long, device=dev)  # filled columns = next RoPE position
        self.next_token = torch.zeros(R, dtype=torch.long, device=dev)
        self.generated = torch.zeros(R, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(R, device=dev)
        self.top_k = torch.zeros(R, dtype=torch.long, device=dev)
        self.top_p = torch.ones(R, device=dev)
        self.penalty = torch.ones(R, device=dev)
        self.uniforms = torch.zeros(R, self.max_len, device=dev)  # each request's random numbers, drawn up front
        self.seen = torch.zeros(R, v.size, dtype=torch.bool, device=dev)  # text ids generated (repetition penalty)
        self._row_tensors = [self.hidden, self.length, self.next_token, self.generated, self.temperature, self.top_k,
                             self.top_p, self.penalty, self.uniforms, self.seen]
        # Text-state masks (0 / -inf, text head's ids only), with and without <boi>: one row per sequence.
        S = self.engine.text_size
        self._text_bias = {allow: self.engine.bias_table(allow, True)[0, :S] for allow in (True, False)}
        self._changed()
        self._state_ready = True

    def _plan(self) -> None:
        """Host-side facts about the batch, rebuilt only when requests join, leave or move, or a row enters or
        leaves an image: which rows need the text head, which the image head (factor by factor, or the joint
        grid for top-k / top-p), which are forced to <eoi>, and which are CFG companions."""
        dev, engine = self.device, self.engine
        text, factored, joint, eoi, companions = [], [], [], [], []
        for seq in self._seqs:
            s = seq.request.sampling
            if seq.companion >= 0:
                companions.append((seq.companion, seq.row))
            if not seq.in_image:
                text.append(seq)
            elif seq.remaining == 0:
                eoi.append(seq.row)
            elif engine.factors is not None and s.top_k is None and (s.top_p is None or s.top_p >= 1.0):
                factored.append(seq)
            else:
                joint.append(seq)
        n = self._used

        def rows(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.long, device=dev)

        everyone = len(text) == n and all(seq.row == i for i, seq in enumerate(text))  # rows 0..n-1, in order
        self._p_text = None
        if text:
            index = None if everyone else rows([seq.row for seq in text])
            bias = torch.stack([self._text_bias[seq.allow_boi] for seq in text])  # (k, S)
            self._p_text = (index, bias, any(q.request.sampling.temperature > 0 for q in text),
                            any(q.request.sampling.repetition_penalty != 1.0 for q in text))
        self._p_images = []
        for group, is_factored in ((factored, True), (joint, False)):
            if not group:
                continue
            cond = [seq.row for seq in group]
            uncond = [seq.companion if seq.companion >= 0 else seq.row for seq in group]  # scale 1: cond itself
            scale = torch.tensor([[seq.request.sampling.cfg_scale if seq.companion >= 0 else 1.0] for seq in group],
                                 device=dev)
            self._p_images.append((is_factored, rows(cond), rows(cond + uncond), scale,
                                   any(q.request.sampling.temperature > 0 for q in group)))
        self._p_eoi = rows(eoi) if eoi else None
        self._p_companions = (rows([c for c, _ in companions]), rows([r for _, r in companions])) if companions \
            else None
        self._any_sampled = any(seq.request.sampling.temperature > 0 for seq in self._seqs)
        self._any_penalty = any(seq.request.sampling.repetition_penalty != 1.0 for seq in self._seqs)
        self._plan_dirty = False

    def _set_memory(self, fed: int) -> None:
        """Mid fusion: the image features each fed row reads through cross-attention, padded into one batch and
        put where model.hidden looks for them between chunks without images (on the caches object)."""
        items = []
        for r in range(fed):
            owner = self._owner[r]
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
    def _prefill(self, seqs: list[_Seq]) -> None:
        if not self._state_ready:
            self._init_state()
        v = self.vocab
        prompts: list[list[int]] = []
        for seq in seqs:  # their rows are consecutive, in this order
            prompts.append(seq.request.prompt)
            if seq.companion >= 0:
                prompts.append(seq.request.uncond_prompt)
        r0, k, L = seqs[0].row, len(prompts), max(len(p) for p in prompts)
        ids = torch.full((k, L), v.pad, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        ids = ids.to(self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        positions = torch.arange(L, device=self.device).expand(k, L)
        # Causal within each prompt, padding keys hidden. Right padding: every query sees at least key 0.
        cols = torch.arange(L, device=self.device)
        mask = (cols[None, :] <= cols[:, None])[None] & (cols[None, None, :] < lengths[:, None, None])
        for cache in self._caches:
            cache.rows, cache.write = slice(r0, r0 + k), None
        self._caches.memory = None  # mid fusion: computed from these prompts' images (and kept per row below)
        h = self.model.hidden(ids, positions=positions, mask=mask.unsqueeze(1), caches=self._caches, start=0)
        rows = slice(r0, r0 + k)
        self.hidden[rows] = h[torch.arange(k, device=self.device), lengths - 1]
        self.length[rows] = lengths
        self.generated[rows] = 0
        self.seen[rows] = False
        j = 0
        for seq in seqs:
            s = seq.request.sampling
            seq_rows = slice(seq.row, seq.row + seq.request.rows)
            self.temperature[seq_rows] = s.temperature
            self.top_k[seq_rows] = s.top_k or 0
            self.top_p[seq_rows] = 1.0 if s.top_p is None else s.top_p
            self.penalty[seq_rows] = s.repetition_penalty
            seq.in_image = seq.request.prompt[-1] == v.boi
            seq.remaining = v.tokens_per_image if seq.in_image else 0
            if self._caches.memory is not None:  # this request's rows' image features (mid fusion)
                c = self._caches
                seq.memory = [(c.memory[i], c.memory_slot[i], c.memory_valid[i]) for i in range(j, j + seq.request.rows)]
            j += seq.request.rows
            if s.temperature > 0:  # the request's own random stream, independent of the batch
                gen = torch.Generator()
                gen.manual_seed(s.seed) if s.seed is not None else gen.seed()
                self.uniforms[seq.row, : seq.request.max_new_tokens] = torch.rand(
                    seq.request.max_new_tokens, generator=gen).to(self.device)
        self._changed()

    # ---- one decode step -----------------------------------------------------------------------
    def _next_tokens(self, n: int) -> torch.Tensor:
        """The next id of every running row (n,), from its last hidden state: each group of rows through the
        head it needs (see `_plan`). The same ids (greedy) and distributions (sampling) as all logits, one
        mask per state and `sample_rows`; sampled image codes factor by factor are drawn by inverse CDF with
        the row's one uniform: the first factor by its marginal, the next ones by where the uniform fell
        inside the chosen slice, which is the joint inverse CDF (codes are ordered factor by factor)."""
        v, engine = self.vocab, self.engine
        S, V = engine.text_size, v.size
        u = self.uniforms[:n].gather(1, self.generated[:n, None]).squeeze(1) if self._any_sampled else None
        nxt = None
        if self._p_text is not None:
            index, bias, sampled, penalized = self._p_text
            sel = slice(0, n) if index is None else index
            logits = self.model.text_head(self.hidden[sel]).float() + bias
            if penalized:  # on text ids generated so far (CTRL), as Engine
                p = self.penalty[sel].unsqueeze(1)
                logits = torch.where(self.seen[sel, :S], torch.where(logits > 0, logits / p, logits * p), logits)
            if sampled:  # over the whole vocabulary (codes at -inf), exactly what sample_rows saw with all logits
                tok = sample_rows(F.pad(logits, (0, V - S), value=NEG_INF), self.temperature[sel], self.top_k[sel],
                                  self.top_p[sel], u[sel])
            else:
                tok = logits.argmax(-1)
            if index is None:
                nxt = tok
            else:
                nxt = torch.empty(n, dtype=torch.long, device=self.device)
                nxt[index] = tok
        if nxt is None:
            nxt = torch.empty(n, dtype=torch.long, device=self.device)
        for is_factored, cond, both, scale, sampled in self._p_images:
            k = len(cond)
            h = self.hidden[both]
            if is_factored:
                parts = engine.factor_logits(h, k, scale)
                if not sampled:
                    tok = engine.combine_factors([x.argmax(-1) for x in parts])
                else:
                    temperature = self.temperature[cond]
                    hot = temperature > 0
                    r, picks = u[cond], []
                    for x in parts:
                        i, r = _inverse_cdf_residual((x / torch.where(hot, temperature, 1.0).unsqueeze(1)).softmax(-1), r)
                        picks.append(torch.where(hot, i, x.argmax(-1)))
                    tok = engine.combine_factors(picks)
            else:
                logits = self.model.images.logits(h).float()
                logits = logits[k:] + scale * (logits[:k] - logits[k:])
                tok = sample_rows(F.pad(logits, (V - logits.shape[1], 0), value=NEG_INF), self.temperature[cond],
                                  self.top_k[cond], self.top_p[cond], u[cond] if sampled else torch.zeros(k, device=self.device))
            nxt[cond] = tok
        if self._p_eoi is not None:
            nxt[self._p_eoi] = v.eoi  # after N codes only <eoi> may follow
        if self._p_companions is not None:
            companion, cond = self._p_companions
            nxt[companion] = nxt[cond]  # the unconditional row is fed the request's token
        return nxt

    def _step(self) -> None:
        v, n = self.vocab, self._used
        if self._plan_dirty:
            self._plan()
        nxt = self._next_tokens(n)
        if self._any_penalty:
            is_text = (nxt < v.n_text).unsqueeze(1)
            seen = self.seen[:n]
            seen.scatter_(1, nxt.unsqueeze(1), seen.gather(1, nxt.unsqueeze(1)) | is_text)
        self.generated[:n] += 1
        self.next_token[:n] = nxt
        tokens = nxt.tolist()  # the one device -> host sync of a step

        # Advance each request's state machine (as Engine.generate), hand out the tokens; finished ones leave.
        ended = []
        for seq in self._seqs:
            tok, handle = tokens[seq.row], seq.handle
            seq.generated += 1
            closed = False
            if seq.in_image:
                if seq.remaining == 0:  # this token is <eoi>
                    seq.in_image, closed = False, True
                    self._plan_dirty = True
                else:
                    seq.remaining -= 1
                    self._plan_dirty |= seq.remaining == 0
            elif tok == v.boi:
                seq.in_image, seq.remaining = True, v.tokens_per_image
                self._plan_dirty = True
            if tok == v.eos:
                ended.append((seq, True))
                continue
            handle.tokens.append(tok)
            if closed and seq.request.stop_after_image:
                ended.append((seq, True))
            elif seq.generated >= seq.request.max_new_tokens:
                ended.append((seq, False))
            else:
                handle._notify()
        self.steps += 1
        if ended:
            with self._lock:
                for seq, _ in ended:
                    self._release(seq)
            for seq, finished in ended:
                seq.handle._finish(finished)

        # Feed the new tokens: rows 0..n-1 (the survivors), each at its own next column.
        n = self._used
        if n == 0:
            return
        compiled = self.engine.compiled
        # Attend over the columns the longest row has filled (a dynamic size for torch.compile too: attending over
        # whole rows kept shapes static but cost 8.0 ms instead of 5.4-5.8 ms per step at 32 rows on the CPU of
        # docs/performance.md). Compiled, feed at least 2 rows, since torch.compile specialises size-1
        # dimensions; the extra row is a free one, whose cache nothing reads.
        fed = 2 if compiled and n == 1 and self.rows > 1 else n
        kv_len = max(s.length for s in self._seqs) + 1
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
        for seq in self._seqs:
            seq.length += 1


def _inverse_cdf_residual(probs: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, f) probabilities (unnormalised), (k,) uniforms in [0, 1) -> the first index whose cumulative mass
    exceeds u * total (never a zero-probability one), and where u fell inside that index's slice, in [0, 1]:
    the uniform for the next factor."""
    cum = probs.cumsum(-1)
    total = cum[:, -1]
    x = torch.minimum(uniform.to(cum.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cum, x.unsqueeze(1), right=True).squeeze(1)
    below = F.pad(cum, (1, 0)).gather(1, index.unsqueeze(1)).squeeze(1)
    width = cum.gather(1, index.unsqueeze(1)).squeeze(1) - below
    return index, ((x - below) / width).clamp(0.0, 1.0)
