"""Continuous batching: requests join and leave one running batch between decode steps.

`Engine.generate` runs a fixed batch from start to end. A server meets requests one by one, at any
time, with different lengths and settings; the `Scheduler` runs them all in one batch instead
(`nmm.infer.batch`: its rows, prefill and decode step):

- **Admission.** A request takes one row of the batch's KV cache, or two with classifier-free
  guidance. Requests that find no free row wait in a FIFO queue (no overtaking); none is dropped,
  and `max_queue` bounds the queue (`QueueFull`). Requests admitted at the same step are prefilled
  together, up to `max_prefill_tokens` prompt tokens, so a burst of long prompts does not stall the
  running rows for long.
- **Decode.** Every step, all running rows go through the model together, one token per row; logits
  -> tokens runs with per-row settings (temperature, top-k, top-p, repetition penalty, CFG scale,
  `min_new_tokens` / `ignore_eos`) and per-request random streams (`nmm.infer.sampling`), so a seeded
  request gives the same answer whoever else is in the batch.
- **State.** Each request keeps its own decoding state (`nmm.infer.decoding`: text -> `<boi>` ->
  exactly `tokens_per_image` codes -> `<eoi>` -> text), its own position and its own stop conditions
  (`<eos>`, `max_new_tokens`, or the end of an image with `stop_after_image`). Models without a head
  over image codes are never offered `<boi>`, and a prompt ending in `<boi>` is refused for them.
- **Leaving.** A finished (or cancelled) request frees its rows at once.

It shares its Engine's model, state machine, heads (`nmm.infer.picker`), sampler and KV cache class,
so greedy decoding gives token for token what `Engine.generate` gives for the same prompt, alone or in
a busy batch (the same arithmetic, up to float rounding in differently shaped matmuls), and a seeded
request samples what `Engine.generate` samples for that prompt alone with that seed.

One daemon thread runs the loop; `submit` may be called from any thread, and each `Handle` reports
new tokens through an optional callback (the HTTP server uses it to stream).
"""

from __future__ import annotations

import atexit
import threading
from collections import deque
from collections.abc import Callable

import torch

from nmm.infer.batch import Batch, Seq
from nmm.infer.engine import Engine
from nmm.infer.requests import Handle, QueueFull, Request

__all__ = ["Handle", "QueueFull", "Request", "Scheduler"]


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
        self._queue: deque[Seq] = deque()
        self._batch = Batch(engine, rows, self.max_len)  # the running requests and their rows
        self._paused = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    # ---- public ------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        """Requests in the batch now."""
        return len(self._batch.seqs)

    @property
    def waiting(self) -> int:
        """Requests queued for rows."""
        return len(self._queue)

    @property
    def rows_in_use(self) -> int:
        return self._batch.used

    @property
    def steps(self) -> int:
        """Decode steps run (for metrics)."""
        return self._batch.steps

    def check(self, request: Request) -> None:
        """Raise ValueError if `request` can never run here."""
        v = self.vocab
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if request.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be at least 0, got {request.min_new_tokens}")
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
        if request.prompt:
            self.engine.check_prompt(request.prompt)  # CannotGenerate: it opens an item the model cannot write
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
                                    f"{self.running} running")
            allow = self.engine.decoder.allow_set
            self._queue.extend(Seq(h, allow(h.request.allow_images)) for h in handles)
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
        free = self._batch.free
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
                decode = bool(self._batch.seqs) and not self._paused
                if not admitted and not decode:  # idle, paused, or the queue's head waits for rows
                    self._lock.wait()  # until a submit, cancel, resume or close
                    continue
            try:
                if admitted:
                    self._batch.prefill(admitted)
                if decode:
                    self._step()
            except Exception as e:  # a bug or an out-of-memory: fail what is running, keep serving
                with self._lock:
                    for seq in self._batch.clear():
                        seq.handle.finish(error=e)
        with self._lock:
            for seq in [*self._batch.clear(), *self._queue]:
                seq.handle.finish(error=RuntimeError("the scheduler was closed"))
            self._queue = deque()

    def _step(self) -> None:
        """One decode step: choose every row's token, let finished requests go, feed the survivors."""
        ended = self._batch.pick()
        if ended:
            with self._lock:
                for seq, _ in ended:
                    self._batch.release(seq)
            for seq, finished in ended:
                seq.handle.finish(finished)
        self._batch.feed()

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._queue if s.handle.cancelled]:
            self._queue.remove(seq)
            seq.handle.finish()
        for seq in [s for s in self._batch.seqs if s.handle.cancelled]:
            self._batch.release(seq)
            seq.handle.finish()

    def _admit(self) -> list[Seq]:
        """Move queued requests (FIFO, no overtaking) into free rows, up to the prefill budget."""
        admitted, tokens = [], 0
        while self._queue:
            seq = self._queue[0]
            need = seq.request.rows
            prompt_tokens = len(seq.request.prompt) + (len(seq.request.uncond_prompt) if need == 2 else 0)
            if need > self._batch.free or (admitted and tokens + prompt_tokens > self.max_prefill_tokens):
                break
            self._queue.popleft()
            self._batch.admit(seq)
            admitted.append(seq)
            tokens += prompt_tokens
        return admitted
