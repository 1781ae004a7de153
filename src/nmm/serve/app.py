"""The HTTP server: an OpenAI-compatible API over a `Pipeline`, Prometheus metrics and a web playground.

    app = create_app(nmm.load("runs/demo"), "demo")      # or: nmm serve runs/demo

Routes (nmm.serve.routes): GET /v1/models, POST /v1/chat/completions (text, images, audio and video in;
text, an image, speech or a video clip out; optional server-sent-event streaming), POST
/v1/images/generations, GET /health, GET /metrics, GET / (playground); (nmm.serve.audio) POST
/v1/audio/transcriptions and POST /v1/audio/speech for models with an audio modality; and
(nmm.serve.video) OpenAI's videos API, POST /v1/videos and its GETs, for models with a video modality. All generation goes through one
continuous-batching `Scheduler` (nmm.infer.scheduler) on its own thread: concurrent requests share the running batch, tokens stream out as they are decoded
(nmm.serve.streaming), requests beyond the batch's rows wait in its queue, and a full queue answers 429.
Two exceptions by model: pictures from continuous-image models (no code head: `images.emits_codes` False)
come from the pipeline's flow sampler, called off the event loop; models that cannot draw at all (late and
mid fusion: no "M2G" in `images.capabilities`) answer a picture request with a 400 (`images_not_supported`).

The other modules: state (what the routes share, on `app.state.server`), gate (API key, body cap and
request metrics, as ASGI middleware), errors (OpenAI's error shape for every failure), metrics (the
Prometheus text), schemas (request bodies, `Limits`, chat -> prompt), checks (model name, `n`, sampling
fields, requests for one item), audio (the audio routes, audio inputs and spoken answers), video (the
videos API, video inputs and video answers). docs/server.md describes the formats.
"""

from __future__ import annotations

from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from nmm.api import Pipeline
from nmm.infer.engine import Engine
from nmm.serve.audio import router as audio_router
from nmm.serve.errors import add_error_handlers
from nmm.serve.gate import Gate
from nmm.serve.routes import STATIC, router
from nmm.serve.schemas import Limits
from nmm.serve.state import ServerState
from nmm.serve.video import router as video_router


def create_app(pipe: Pipeline, model_name: str, api_key: str | None = None, limits: Limits = Limits()) -> FastAPI:
    """An ASGI app serving `pipe` as `model_name`; with `api_key`, /v1 routes need 'Bearer KEY'.

    Raises ValueError when `limits` leave no room for one batch row (`nmm serve` reports it)."""
    state = ServerState.create(pipe, model_name, limits)
    app = FastAPI(title=f"nmm: {model_name}", docs_url=None, redoc_url=None)
    app.state.server = state
    # Also on app.state by name: `nmm serve` prints the scheduler's rows and tests drive the scheduler.
    app.state.scheduler, app.state.metrics = state.scheduler, state.metrics
    app.add_middleware(Gate, metrics=state.metrics, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    add_error_handlers(app)
    app.include_router(router)
    app.include_router(audio_router)
    app.include_router(video_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ---- what `nmm serve` serves ---------------------------------------------------------------------
def build_random_pipeline(preset: str, seed: int = 0) -> Pipeline:
    """A pipeline with random (untrained) weights from a preset: for trying the API without training.

    The text tokenizer is trained on the data source's texts (for the shapes world: its captions,
    questions and edits; for speech: its sentences), a second or so; the modality codecs (an image
    tokenizer, an audio codec) and the transformer are left at their random initialisation."""
    from nmm.config import load_config
    from nmm.data.sources import data_source, world_texts
    from nmm.modalities.codecs import Codecs, untrained_codec
    from nmm.modalities.text import TextTokenizer
    from nmm.model.model import NativeMultimodalModel

    cfg = load_config(preset)
    source = data_source(cfg)
    world = getattr(source, "world", None)
    if cfg.data.source == "shapes":  # as before: a sample of the world's texts and all of its words
        texts = world_texts(world, 300, seed) + world.all_words()
    else:
        texts = source.texts()
    text = TextTokenizer.train(texts, vocab_size=cfg.text.vocab_size)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        codecs = Codecs(text, *(untrained_codec(name, cfg).eval() for name in source.modalities))
        model = NativeMultimodalModel(cfg.model, codecs.vocab).eval()
    return Pipeline(model, codecs, "cpu")


def load_pipeline(target: str, dtype: torch.dtype | str | None = None, compile: bool = False) -> tuple[Pipeline, str]:
    """A run directory -> (its trained pipeline, its name); a preset -> (random weights, 'PRESET-random').

    `dtype` (e.g. "bf16") casts the model's weights; `compile` runs its decode step through torch.compile."""
    path = Path(target)
    if path.is_dir() or ("/" in target and path.suffix not in (".yaml", ".yml")):
        import nmm

        # bf16 straight from the file (no fp32 copy first); the Engine below still casts other dtypes
        pipe = nmm.load(path, dtype="bf16") if dtype in ("bf16", torch.bfloat16) else nmm.load(path)
        name = path.resolve().name
    else:
        pipe, name = build_random_pipeline(target), f"{path.stem}-random"
    if dtype is not None or compile:
        pipe.engine = Engine(pipe.model, pipe.engine.device, dtype=dtype, compile=compile)
    return pipe, name
