"""The routes: GET /v1/models[/{model}], POST /v1/chat/completions, POST /v1/images/generations,
GET /health, GET /metrics and the playground (GET /, its files under /static). The audio routes and
the audio parts of chat are in nmm.serve.audio, the video ones in nmm.serve.video.

Each handler is a module-level function on `router`; it gets the app's `ServerState` through the
`server` dependency. A request is checked here (model, n, sizes, the token budget) before anything is
queued, so a refusal is always a plain JSON 4xx, never half a stream. docs/server.md describes the formats.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse

from nmm.api import Pipeline
from nmm.infer.scheduler import Request
from nmm.modalities.document import ItemSegment
from nmm.serve.audio import answer_audio, audio_tokens, input_audio_reader, speech_requests
from nmm.serve.checks import check_common, or_default, sampling
from nmm.serve.schemas import ApiError, ChatRequest, ImageRequest, picture_caption, prompt_segments, token_budget
from nmm.serve.state import ServerState, server
from nmm.serve.streaming import collect, progress, sse, start_pictures, submit
from nmm.serve.video import video_card, video_requests, video_url_reader

STATIC = Path(__file__).parent / "static"  # the playground: plain HTML/JS, no build step

router = APIRouter()
State = Annotated[ServerState, Depends(server)]


# ---- health, metrics, playground -----------------------------------------------------------------
@router.get("/health")
async def health(state: State):
    return {"status": "ok", "model": state.model_name}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(state: State):
    return PlainTextResponse(state.metrics.render(state.scheduler), media_type="text/plain; version=0.0.4")


@router.get("/", include_in_schema=False)
async def playground():
    return FileResponse(STATIC / "index.html")


# ---- the OpenAI API ------------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(state: State):
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model}")
async def get_model(model: str, state: State):
    check_common(state, model, 1)
    return _model_card(state)


@router.post("/v1/images/generations")
async def images(req: ImageRequest, state: State):
    check_common(state, req.model, req.n)
    size = state.image_size
    if size is None:
        raise ApiError(400, "this model has no image modality", code="images_not_supported")
    if req.response_format not in (None, "b64_json"):
        raise ApiError(400, "only response_format 'b64_json' is supported", param="response_format",
                       code="invalid_value")
    if req.size not in (None, "auto", f"{size}x{size}"):
        raise ApiError(400, f"size must be '{size}x{size}' (the model's image size)", param="size",
                       code="invalid_value")
    requests, _ = _picture_requests(state, req.prompt, req.n, req)
    answers = await collect(state, *await start_pictures(state, requests, req, stream=False), item="image")
    pngs = [content[0]["image_url"]["url"].split(",", 1)[1] for content, _ in answers]
    return {"created": int(time.time()), "data": [{"b64_json": p, "revised_prompt": req.prompt} for p in pngs],
            "output_format": "png", "size": f"{size}x{size}"}


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, state: State):
    check_common(state, req.model, req.n)
    pipe, limits, per_image = state.pipe, state.limits, state.per_image
    light = _text_only_and_short(req.messages)  # tokenised in place: a thread hop would cost more than that
    args = (req.messages, pipe.codecs.encode_text, limits, state.image_size, input_audio_reader(state),
            video_url_reader(state))
    segments, last_user = prompt_segments(*args) if light else await run_in_threadpool(prompt_segments, *args)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    wants = set(req.modalities or ())
    spoken, filmed = "audio" in wants, "video" in wants
    if filmed and (spoken or "image" in wants):
        raise ApiError(400, f"modalities asks for a video and {'audio' if spoken else 'an image'}; an answer is "
                       "one of them", param="modalities", code="invalid_value")
    # "draw ..." asks for a picture only of a model with images; `modalities: ["image"]` always does.
    caption = None if spoken or filmed else picture_caption(last_user, req.modalities,
                                                            triggers=state.image_size is not None)
    item = "audio" if spoken else "video" if filmed else "image" if caption is not None else None
    if filmed:  # the answer is a clip of the last user text (what `Pipeline.generate_items("video")` does)
        requests, prompt_tokens = video_requests(state, last_user, req.n, req, "messages")
        handles, updates = submit(state, requests, req.stream)
    elif spoken:  # the answer is speech of the last user text (what `Pipeline.speak` does)
        if req.audio is not None and req.audio.format != "wav":
            raise ApiError(400, f"audio.format '{req.audio.format}' is not supported; use 'wav'",
                           param="audio.format", code="invalid_value")
        requests, prompt_tokens = speech_requests(state, last_user, req.n, req, "messages")
        handles, updates = submit(state, requests, req.stream)
    elif caption is not None:  # the answer is a picture
        requests, prompt_tokens = _picture_requests(state, caption, req.n, req)
        handles, updates = await start_pictures(state, requests, req, req.stream)
    else:
        prompt_tokens = 1 + sum(_segment_tokens(state, seg) for seg in segments)
        max_new = token_budget(req, prompt_tokens, state.context, limits)  # before encoding any item
        ids = _prompt_ids(pipe, segments) if light else await run_in_threadpool(_prompt_ids, pipe, segments)
        penalty = or_default(req.repetition_penalty, 1.0)
        requests = [Request(ids, max_new, sampling(req, 0.0, i, repetition_penalty=penalty), allow_images=False,
                            min_new_tokens=req.min_tokens, ignore_eos=req.ignore_eos) for i in range(req.n)]
        handles, updates = submit(state, requests, req.stream)  # a 429 or 400 is still plain JSON, never a half-stream

    def usage() -> dict:  # read after generation: the handles' tokens are final by then
        if item == "image":
            completion = req.n * (per_image + 1)
        else:  # text counts its <eos>; speech and video their codes and end token, which are among its tokens
            completion = sum(len(h.tokens) + (h.finished and item is None) for h in handles)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        audio = [answer_audio("", last_user.strip()) for _ in handles] if spoken else None
        events = sse(base, req.n, progress(state, handles, updates, item), usage if include_usage else None, audio)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    answers = await collect(state, handles, updates, item)
    if spoken:  # OpenAI's shape: no content, the speech (and what it says) under `audio`
        messages = [{"role": "assistant", "content": None, "audio": answer_audio(wav, last_user.strip())}
                    for wav, _ in answers]
    else:
        messages = [{"role": "assistant", "content": content} for content, _ in answers]
    choices = [{"index": i, "message": message, "finish_reason": finish, "logprobs": None}
               for i, (message, (_, finish)) in enumerate(zip(messages, answers))]
    return {**base, "object": "chat.completion", "choices": choices, "usage": usage()}


# ---- checks and scheduler requests ---------------------------------------------------------------
def _model_card(state: ServerState) -> dict:
    card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "nmm",
            "context_length": state.context, "modalities": ["text", *state.pipe.codecs.modalities]}
    if state.image_size is not None:
        card["image_size"] = state.image_size
    if state.audio is not None:
        card["audio"] = {"sample_rate": state.audio.config.sample_rate, "max_seconds": state.audio.config.max_seconds,
                         "tokens_per_second": state.audio.tokens_per_second, "can_speak": state.can_speak}
    if state.video is not None:
        card["video"] = video_card(state)
    return card


def _picture_requests(state: ServerState, caption: str, n: int, req) -> tuple[list[Request], int]:
    """n requests for pictures of `caption` (CFG against an empty caption, as Pipeline.generate_images),
    and the prompt's length."""
    pipe, per_image, context = state.pipe, state.per_image, state.context
    if state.image_size is None:
        raise ApiError(400, "this model has no image modality", code="images_not_supported")
    if not state.can_draw:
        raise ApiError(400, f"this model cannot generate images (a {pipe.model.cfg.variant} model reads images "
                       "and writes text)", code="images_not_supported")
    prompt = pipe.image_prompt(caption)
    if len(prompt) + per_image + 1 > context:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; with an image of {per_image + 1} tokens it "
                       f"exceeds the model's context of {context}", code="context_length_exceeded")
    return [Request(prompt, per_image + 1, sampling(req, 0.3, i, cfg_scale=or_default(req.cfg_scale, 2.0)),
                    uncond_prompt=pipe.uncond_image_prompt(), stop_after_image=True) for i in range(n)], len(prompt)


def _segment_tokens(state: ServerState, segment) -> int:
    """Prompt tokens of one prompt segment: an item's codes and its begin and end tokens, or text's ids."""
    if isinstance(segment, ItemSegment):  # a video, encoded as it was read
        return len(segment.codes) + 2
    kind, x = segment
    return state.per_image + 2 if kind == "image" else audio_tokens(state, x) if kind == "audio" else len(x)


def _text_only_and_short(messages, limit: int = 4000) -> bool:
    """No images and little text: preparing the prompt takes microseconds, so it can run on the event loop."""
    chars = 0
    for m in messages:
        if isinstance(m.content, list):
            if any(p.type != "text" for p in m.content):
                return False
            chars += sum(len(p.text) for p in m.content)
        elif m.content is not None:
            chars += len(m.content)
    return chars <= limit


def _prompt_ids(pipe: Pipeline, segments: list) -> list[int]:
    """Prompt segments, ("text", ids), ("image", uint8 array), ("audio", wave) and ItemSegment("video", codes),
    -> ids (`Codecs.prompt`: <bos>, each text, each item as <boi> codes <eoi>, <boa> codes <eoa> or
    <bov> codes <eov>, a modality's items encoded in one batch)."""
    return pipe.codecs.prompt(segments)
