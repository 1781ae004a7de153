"""What a caller hands the `Scheduler` (`Request`) and what it gets back (`Handle`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nmm.infer.sampling import SamplingConfig


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    uncond_prompt: list[int] | None = None  # CFG: the unconditional prompt (used when cfg_scale != 1)
    allow_images: bool | Iterable[str] = True  # may the answer open images (or: the modalities it may open)
    stop_after_image: bool = False  # end at the first item's end token (<eoi>: image generation)
    min_new_tokens: int = 0  # <eos> is not allowed before this many tokens
    ignore_eos: bool = False  # <eos> is never allowed: the answer runs max_new_tokens (fixed-length decoding)

    @property
    def guided(self) -> bool:
        return self.uncond_prompt is not None and self.sampling.cfg_scale != 1.0

    @property
    def rows(self) -> int:
        return 2 if self.guided else 1

    @property
    def eos_from(self) -> int:
        """The first step that may choose <eos>."""
        return self.max_new_tokens if self.ignore_eos else self.min_new_tokens


class QueueFull(Exception):
    """More requests would wait than the scheduler's `max_queue` allows."""


class Handle:
    """A submitted request. `tokens` grows as they are generated (prompt excluded, `<eos>` excluded, as in
    `GenerationResult`); `finished` is True when the request ended at `<eos>` (or at `<eoi>` with
    `stop_after_image`), False when `max_new_tokens` ran out or it was cancelled.

    `on_update(handle)` is called after each step that gave the handle tokens and when it ends; `wake` is how
    `cancel` nudges the scheduler's loop. A handle made outside a scheduler (an answer computed another way)
    takes neither and is ended with `finish`."""

    def __init__(self, request: Request, on_update: Callable[[Handle], None] | None = None,
                 wake: Callable[[], None] | None = None):
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
        if self._wake is not None:
            self._wake()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> list[int]:
        if not self._done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self.error is not None:
            raise self.error
        return self.tokens

    def notify(self) -> None:
        """Tell the consumer (`on_update`) that tokens came; a failing consumer never stops the batch."""
        if self._on_update is not None:
            try:
                self._on_update(self)
            except Exception:  # a consumer that went away (e.g. a closed event loop) must not stop the batch
                pass

    def finish(self, finished: bool = False, error: BaseException | None = None,
               tokens: list[int] | None = None) -> None:
        """End the request: `finished` as in the class docstring, or with `error`; `tokens`, when given, are
        its whole answer (for answers computed outside the scheduler)."""
        if tokens is not None:
            self.tokens = list(tokens)
        self.finished, self.error = finished, error
        self._done.set()
        self.notify()
