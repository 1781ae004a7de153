"""What one server holds: the pipeline, its scheduler, its counters and the model facts routes check against.

`create_app` builds one `ServerState` and puts it on `app.state.server`; every route reaches it through
the `server` dependency, so handlers are plain module-level functions instead of closures.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from fastapi import Request as HTTPRequest

from nmm.api import Pipeline
from nmm.infer.scheduler import Scheduler
from nmm.modalities.audio import AudioCodec
from nmm.modalities.video import VideoCodec
from nmm.serve.metrics import Metrics
from nmm.serve.schemas import Limits


class Store:
    """What the server made and keeps for later requests (the videos API's clips), at most `capacity`
    entries: adding one more evicts the oldest, so memory stays bounded. Only the event loop touches it."""

    def __init__(self, capacity: int):
        self.capacity, self._items = capacity, OrderedDict()

    def add(self, key: str, value) -> None:
        self._items[key] = value
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, key: str):
        return self._items.get(key)

    def pop(self, key: str):
        return self._items.pop(key, None)

    def values(self) -> list:
        """Oldest first."""
        return list(self._items.values())


@dataclass(frozen=True)
class ServerState:
    pipe: Pipeline
    model_name: str
    limits: Limits
    scheduler: Scheduler  # all generation goes through it (continuous batching on its own thread)
    metrics: Metrics
    created: int  # unix time the app was built: the model card's "created"
    image_size: int | None  # pixels per side of the images the model reads and draws; None: no images
    context: int  # the model's max_seq_len (prompt + answer)
    per_image: int  # codes per image (an image in a prompt is <boi> codes <eoi>); 0 without images
    can_draw: bool  # late and mid fusion read images but cannot draw them
    audio: AudioCodec | None  # the audio codec (16 kHz waves <-> codes); None: no audio modality
    can_speak: bool  # the model writes audio codes (an audio answer is <boa> codes <eoa>)
    video: VideoCodec | None = None  # the video codec (clips <-> codes); None: no video modality
    can_make_video: bool = False  # the model writes video codes (a video answer is <bov> codes <eov>)
    videos: Store = field(default_factory=lambda: Store(0))  # /v1/videos results, by id

    @classmethod
    def create(cls, pipe: Pipeline, model_name: str, limits: Limits) -> ServerState:
        """Raises ValueError when the limits leave no room for one batch row (e.g. a tiny max_cache_mb)."""
        max_cache = None if limits.max_cache_mb is None else int(limits.max_cache_mb * 2**20)
        scheduler = Scheduler(pipe.engine, max_batch=limits.max_batch, max_cache_bytes=max_cache,
                              max_queue=limits.max_queue)
        image, audio, video = (pipe.codecs.modalities.get(name) for name in ("image", "audio", "video"))
        writes = {name: "M2G" in m.capabilities for name, m in pipe.model.modalities.items()}
        return cls(pipe, model_name, limits, scheduler, Metrics(), int(time.time()),
                   image_size=image.config.image_size if image is not None else None,
                   context=pipe.model.cfg.max_seq_len,
                   per_image=pipe.vocab.tokens_per_image if image is not None else 0,
                   # an imported codec may encode only (Chameleon's checkpoint has no VQ decoder)
                   can_draw=writes.get("image", False) and getattr(image, "can_decode", True), audio=audio, can_speak=writes.get("audio", False),
                   video=video, can_make_video=writes.get("video", False), videos=Store(limits.max_stored_videos))


async def server(request: HTTPRequest) -> ServerState:
    """FastAPI dependency: the state of the app serving `request`. Async on purpose: FastAPI runs a plain
    `def` dependency on its thread pool, a thread hop per request for one attribute read."""
    return request.app.state.server
