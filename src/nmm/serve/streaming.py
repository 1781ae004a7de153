"""From the scheduler's thread to the client: queueing a request's choices, waking the event loop as
tokens are decoded, turning them into text pieces (or a PNG once an image is complete, a WAV once
speech is, a GIF once a video clip is), and the server-sent events of a streamed chat completion.

    handles, updates = submit(state, requests, stream=True)
    async for i, kind, value in progress(state, handles, updates, item=None): ...
    # kind: "text" (a piece of text), "image" (PNG, base64), "audio" (WAV, base64), "video" (GIF, base64),
    # "end" (finish_reason "stop" | "length")
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Callable

import numpy as np
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from nmm.api import Pipeline
from nmm.infer.sampling import SamplingConfig
from nmm.infer.scheduler import Handle, QueueFull, Request
from nmm.serve.schemas import ApiError
from nmm.serve.state import ServerState


class _Updates:
    """Wakes an asyncio task when the scheduler, on its own thread, reports progress on its requests.

    `every_token` False wakes it only when a request ends: a non-streamed answer needs no wake-up per
    token, and at 32 concurrent clients those wake-ups would cost the event loop (and the GIL) dearly."""

    def __init__(self, every_token: bool = True):
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self.every_token = every_token

    def __call__(self, handle: Handle) -> None:  # on the scheduler's thread
        if self.every_token or handle.done:
            self._loop.call_soon_threadsafe(self._event.set)

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()  # anything reported after this sets it again: no wake-up is lost


# ---- starting generation -------------------------------------------------------------------------
def submit(state: ServerState, requests: list[Request], stream: bool) -> tuple[list[Handle], _Updates]:
    """Queue a request's choices in the scheduler (all or none); a full queue is a 429."""
    updates = _Updates(every_token=stream)
    try:
        return state.scheduler.submit_many(requests, updates), updates
    except QueueFull as e:
        raise ApiError(429, f"the server is busy ({e}); retry shortly", type="rate_limit_error",
                       code="queue_full") from None
    except ValueError as e:  # the scheduler's own checks (lengths, ids): input a route did not catch
        raise ApiError(400, str(e), code="invalid_value") from None


async def start_pictures(state: ServerState, requests: list[Request], req,
                         stream: bool) -> tuple[list[Handle], _Updates]:
    """Pictures from the scheduler, code by code; or, for models whose images are not codes (continuous
    latents: `images.emits_codes` False), from the pipeline's own sampler (a flow), all choices in one call
    off the event loop, handed back as finished handles."""
    pipe = state.pipe
    if pipe.model.images.emits_codes:
        return submit(state, requests, stream)
    first = requests[0]
    sampling = SamplingConfig(cfg_scale=first.sampling.cfg_scale, seed=req.seed)
    codes = await run_in_threadpool(pipe.item_codes, "image", [r.prompt for r in requests], sampling,
                                    first.uncond_prompt)
    handles = []
    for r, row in zip(requests, codes):
        handle = Handle(r)
        handle.finish(True, tokens=[*map(int, row), pipe.vocab.end("image")])
        handles.append(handle)
    return handles, _Updates(every_token=stream)


# ---- reading what the choices produce ------------------------------------------------------------
async def progress(state: ServerState, handles: list[Handle], updates: _Updates,
                   item: str | None = None) -> AsyncIterator[tuple]:
    """What the choices produce, as it comes: (index, "text", piece) for text answers (`item` None);
    (index, item, file base64) once the item is complete (`item` "image": a PNG, "audio": a WAV, "video":
    a GIF); and (index, "end", finish_reason). Leaving early cancels what still runs."""
    pipe, per_image = state.pipe, state.per_image
    texts = [_TextStream(pipe.codecs.decode_text) for _ in handles]
    seen, ended = [0] * len(handles), [False] * len(handles)
    try:
        while not all(ended):
            for i, h in enumerate(handles):
                if ended[i]:
                    continue
                done = h.done  # read first: a finished handle already holds all its tokens
                new = h.tokens[seen[i]:]
                seen[i] += len(new)
                if item is None:
                    for token in new:
                        if piece := texts[i].push(token):
                            yield i, "text", piece
                if not done:
                    continue
                ended[i] = True
                if h.error is not None:
                    raise h.error
                if item == "image":
                    yield i, "image", await run_in_threadpool(_png_of, pipe, h.tokens[:per_image])
                elif item is not None:
                    yield i, item, await run_in_threadpool(_file_of, pipe, item, h.tokens)
                elif piece := texts[i].finish():
                    yield i, "text", piece
                yield i, "end", "stop" if h.finished else "length"
            if not all(ended):
                await updates.wait()
    finally:
        for h in handles:
            if not h.done:
                h.cancel()  # the client left (or a sibling choice failed): free the rows at once
        # Text counts its <eos>; an item's tokens are its codes and its end token (<eoi>, <eoa>, <eov>).
        state.metrics.add_tokens(item or "text", sum(len(h.tokens) + (h.finished and item is None) for h in handles))


async def collect(state: ServerState, handles: list[Handle], updates: _Updates,
                  item: str | None = None) -> list[tuple]:
    """Wait for every choice: [(content, finish_reason)], content a string, [image_url part] (`item`
    "image"), [video_url part] (`item` "video") or a base64 WAV (`item` "audio")."""
    contents: list = [[] for _ in handles]
    finishes = [None] * len(handles)
    async for i, kind, value in progress(state, handles, updates, item):
        if kind == "end":
            finishes[i] = value
        else:
            contents[i].append(value)
    if item in PARTS:
        return [([item_part(item, c[0])], f) for c, f in zip(contents, finishes)]
    if item == "audio":
        return [(c[0], f) for c, f in zip(contents, finishes)]
    return [("".join(c), f) for c, f in zip(contents, finishes)]


async def sse(base: dict, n: int, progress: AsyncIterator[tuple], usage: Callable[[], dict] | None,
              audio: list[dict] | None = None):
    """Server-sent events in OpenAI's chat.completion.chunk format, sent as the tokens are decoded.

    `audio` (speech answers: per choice {"id", "transcript", "expires_at"}) follows OpenAI's streamed
    audio: the first delta carries the audio's id and transcript, one delta its data (the whole WAV, once
    the item is complete: the codec decodes a whole item), the last audio delta only its expires_at."""
    def event(index: int, delta: dict, finish: str | None = None) -> str:
        chunk = {**base, "object": "chat.completion.chunk",
                 "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(chunk)}\n\n"

    try:
        for i in range(n):
            if audio is None:
                yield event(i, {"role": "assistant", "content": ""})
            else:
                yield event(i, {"role": "assistant", "content": None,
                                "audio": {"id": audio[i]["id"], "transcript": audio[i]["transcript"]}})
        async for i, kind, value in progress:
            if kind == "text":
                yield event(i, {"content": value})
            elif kind in PARTS:  # a picture or clip: one delta whose content is the list with its part
                yield event(i, {"content": [item_part(kind, value)]})
            elif kind == "audio":
                yield event(i, {"audio": {"data": value}})
                yield event(i, {"audio": {"expires_at": audio[i]["expires_at"]}})
            else:
                yield event(i, {}, value)
        if usage is not None:
            last = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage()}
            yield f"data: {json.dumps(last)}\n\n"
    except Exception:  # a failure after the 200 was sent: say so in-band (the openai client raises on it)
        error = ApiError(500, "internal server error while generating", type="server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        await progress.aclose()  # cancels the scheduler requests if the client went away
    yield "data: [DONE]\n\n"


# ---- tokens -> text and pictures -----------------------------------------------------------------
class _TextStream:
    """Generated ids -> text pieces as they come; a token ending inside a UTF-8 character waits for the next."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.tokens, self.shown = decode, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        return self._piece(final=False)

    def finish(self) -> str:
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        text = self.decode(self.tokens).lstrip()
        if (final or not text.endswith("\ufffd")) and text.startswith(self.shown) and len(text) > len(self.shown):
            piece, self.shown = text[len(self.shown):], text
            return piece
        return ""


def _png_of(pipe: Pipeline, tokens: list[int]) -> str:
    """A generated image's code ids -> PNG as base64."""
    return _png_b64(pipe.codecs.decode_images(np.array([tokens]))[0])


def decode_item(pipe: Pipeline, name: str, tokens: list[int]):
    """A generated item's ids (codes, then its end token unless cut short) -> the item (a wave, a clip).
    No codes (the model ended a variable-length item at once) is an item too: a wave of no samples, a
    clip of empty frames."""
    end, spec = pipe.vocab.end(name), pipe.vocab.spec(name)
    codes = np.asarray(tokens[: tokens.index(end)] if end in tokens else tokens, dtype=np.int64)
    return pipe.codecs.decode_items(name, codes[None, : spec.tokens_per_item] if spec.fixed_length else [codes])[0]


def _file_of(pipe: Pipeline, name: str, tokens: list[int]) -> str:
    """A generated item's ids -> its codec's file as base64 (`to_bytes`: a WAV for audio, a GIF for video)."""
    return base64.b64encode(pipe.codecs.codec(name).to_bytes(decode_item(pipe, name, tokens))).decode("ascii")


# The content part an item answer is sent as, its field and MIME type: an image as OpenAI's `image_url`,
# a video clip as nmm's `video_url` (the shape of `image_url`; a GIF, which browsers play in an <img>).
PARTS = {"image": ("image_url", "image/png"), "video": ("video_url", "image/gif")}


def item_part(name: str, b64: str) -> dict:
    field, mime = PARTS[name]
    return {"type": field, field: {"url": f"data:{mime};base64,{b64}"}}


def _png_b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
