"""Video in the server: `video_url` content parts in chat (read by `video_url_reader`), video answers in
chat (`video_requests`), and OpenAI's videos API: POST /v1/videos, GET /v1/videos, GET and DELETE
/v1/videos/{id}, GET /v1/videos/{id}/content.

Video goes through the model's video codec (nmm.modalities.video): a clip is `video.frames` frames at
the frame tokenizer's size, an item in a prompt is `<bov> codes <eov>`, and a video answer is the codes
the model samples after `<bov>`. Files in are GIF / WebP (Pillow) or MP4 / WebM (PyAV), resampled to the
codec's frames; files out are animated GIFs, which every browser plays in an <img> and which need no
video encoder. The codec reads every frame of a file into memory before it resamples, so each file is
probed first (bytes, frame count, pixels, duration, none of which needs its frames decoded) and refused
with a 400 naming the limit when it is too big; docs/server.md lists the limits.

The videos API is synchronous: POST /v1/videos returns once the clip is made (status "completed"), so
the official client's create / retrieve / download_content work without polling. Clips are kept in
memory for the GETs, the newest `Limits.max_stored_videos`.
"""

from __future__ import annotations

import base64
import io
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from PIL import Image
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from nmm.infer.scheduler import Request
from nmm.modalities.document import ItemSegment
from nmm.modalities.video import VideoCodec
from nmm.serve.checks import check_common, item_requests
from nmm.serve.schemas import ApiError, VideoRequest, VideoURL, data_url_bytes
from nmm.serve.state import ServerState, server
from nmm.serve.streaming import collect, decode_item, submit

router = APIRouter()
State = Annotated[ServerState, Depends(server)]
# What a video_url data URL may be: any video/* (MP4, WebM: PyAV reads them) or an animated image.
VIDEO_MIMES = ("video/*", "image/gif", "image/webp", "image/apng")
VARIANTS = ("video", "thumbnail", "spritesheet")  # GET /v1/videos/{id}/content?variant=...


# ---- the codec and its clips ---------------------------------------------------------------------
def video_codec(state: ServerState, param: str | None = None) -> VideoCodec:
    if state.video is None:
        raise ApiError(400, "this model has no video modality", param=param, code="video_not_supported")
    return state.video


def clip_seconds(codec: VideoCodec) -> float:
    """How long the model's clips play: its frames at the GIFs' frame rate."""
    return codec.config.frames / codec.config.fps


def clip_size(codec: VideoCodec) -> str:
    return f"{codec.size}x{codec.size}"


def video_card(state: ServerState) -> dict:
    """`video` in the model card: what a clip is, so clients can check `seconds` and `size` first."""
    codec = video_codec(state)
    return {"frames": codec.config.frames, "size": codec.size, "fps": codec.config.fps,
            "seconds": clip_seconds(codec), "layout": codec.config.layout, "max_tokens": codec.max_tokens,
            "can_generate": state.can_make_video}


# ---- reading video files -------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoInfo:
    frames: int  # counted up to `most` + 1 (more is "too many" whatever the number)
    width: int
    height: int
    seconds: float | None  # None: the file does not say


def probe(raw: bytes, most: int) -> VideoInfo:
    """What a video file holds, without decoding its frames: a GIF / WebP's frame count, screen size and
    frame delays (Pillow); a container's video stream's size and duration and its packets, counted up to
    `most` + 1 (PyAV). Raises ValueError (the reason) when neither can read the file."""
    try:
        with Image.open(io.BytesIO(raw)) as im:
            frames, delays = getattr(im, "n_frames", 1), 0
            if frames <= most:  # seeking reads each frame's header, not its pixels
                for i in range(frames):
                    im.seek(i)
                    delays += im.info.get("duration", 0) or 0
            return VideoInfo(frames, im.width, im.height, delays / 1000 if delays else None)
    except Image.DecompressionBombError:
        raise
    except Exception:  # Pillow raises many types on bytes it does not read: try PyAV
        pass
    try:
        import av
    except ImportError:
        raise ValueError("not a GIF; reading MP4 / WebM needs PyAV: pip install av") from None
    try:
        container = av.open(io.BytesIO(raw))
    except Exception as e:  # av's errors (InvalidDataError, ...) for bytes that are no container
        raise ValueError(f"not a readable video ({e.__class__.__name__})") from None
    with container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        stream = container.streams.video[0]
        context = stream.codec_context  # None: FFmpeg has no decoder for the stream's codec
        if context is None or not (context.width and context.height):
            raise ValueError("not a readable video (no decoder for its codec, or no frame size in its header)")
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = container.duration / av.time_base if container.duration else None
        frames = 0  # the container's own count may be missing or wrong: count the packets
        try:
            for packet in container.demux(stream):
                frames += packet.size > 0
                if frames > most:
                    break
        except Exception as e:  # a file cut short or damaged between packets
            raise ValueError(f"not a readable video ({e.__class__.__name__})") from None
        return VideoInfo(frames, context.width, context.height, seconds)


def read_checked(state: ServerState, raw: bytes, param: str) -> np.ndarray:
    """A video file's bytes -> the model's (frames, S, S, 3) uint8 clip, or a 400 naming `param` and the
    limit: bytes, frames, pixels (all frames together), seconds, in that order, each checked before the
    frames are decoded."""
    codec, limits = video_codec(state, param), state.limits

    def refuse(code: str, message: str):
        return ApiError(400, f"{param}: {message}", param=param, code=code)

    if len(raw) > limits.max_video_bytes:
        raise refuse("video_too_large", f"the video file is {len(raw)} bytes, more than {limits.max_video_bytes}")
    if not raw:
        raise refuse("empty_video", "the video file is empty (0 bytes)")
    try:
        info = probe(raw, limits.max_video_frames)
    except Image.DecompressionBombError:
        raise refuse("video_too_large", f"a frame of the video is more than {2 * Image.MAX_IMAGE_PIXELS} pixels "
                     "(Pillow refuses it as a decompression bomb)") from None
    except ValueError as e:
        raise refuse("invalid_video", str(e)) from None
    if info.frames == 0:
        raise refuse("empty_video", "the video has no frames")
    if info.frames > limits.max_video_frames:
        raise refuse("video_too_long", f"the video has more than {limits.max_video_frames} frames (they would be "
                     f"resampled to the model's {codec.config.frames}); send a shorter clip")
    pixels = info.frames * info.width * info.height
    if pixels > limits.max_video_pixels:
        frames = f"{info.frames} frame{'s' if info.frames > 1 else ''}"
        raise refuse("video_too_large", f"the video is {frames} of {info.width}x{info.height}, "
                     f"{pixels} pixels in all, more than {limits.max_video_pixels}; send a smaller or shorter clip")
    if info.seconds is not None and info.seconds > limits.max_video_seconds:
        raise refuse("video_too_long", f"the video is {info.seconds:.2f} s long; at most "
                     f"{limits.max_video_seconds:g} s")
    try:
        return codec.from_bytes(raw)
    except ValueError as e:  # no frames after all, or the decoder gave up part way
        raise refuse("empty_video" if "no frames" in str(e) else "invalid_video", str(e)) from None
    except Exception:  # hostile bytes raise many types in Pillow and FFmpeg; all mean "not a video"
        raise refuse("invalid_video", "not a readable video") from None


def video_url_reader(state: ServerState):
    """`decode_video(part, param)` for `prompt_segments`: a chat `video_url` part -> its clip, encoded (a
    delta clip's length is only known once it is); None when the model has no video modality (a video
    part is then a 400)."""
    if state.video is None:
        return None
    codecs = state.pipe.codecs

    def decode(part: VideoURL, param: str) -> ItemSegment:
        raw = data_url_bytes(part.url, "video", VIDEO_MIMES, "video/mp4", state.limits.max_video_bytes, param)
        clip = read_checked(state, raw, param)
        return ItemSegment("video", codes=codecs.encode_items("video", clip[None])[0])

    return decode


# ---- video answers -------------------------------------------------------------------------------
def video_requests(state: ServerState, text: str, n: int, req, param: str) -> tuple[list[Request], int]:
    """n requests for a clip of `text` (`item_requests`: prompt `<bos> text <bov>`, the clip's codes up to
    `<eov>`), with classifier-free guidance at cfg_scale 2 by default, as `Pipeline.generate_items`."""
    video_codec(state, param)
    if not state.can_make_video:
        raise ApiError(400, f"this model cannot generate video (a {state.pipe.model.cfg.variant} model reads "
                       "video and writes text)", param=param, code="video_not_supported")
    if not text.strip():
        raise ApiError(400, f"{param}: there is no text to make a video of", param=param, code="invalid_value")
    return item_requests(state, "video", text, n, req, param, cfg_default=2.0, what="a video")


# ---- the videos API ------------------------------------------------------------------------------
@dataclass
class StoredVideo:
    video: dict  # the Video object, as GET /v1/videos/{id} returns it
    gif: bytes
    tokens: list[int]  # what the model wrote: the thumbnail and spritesheet are decoded from them


async def _body(request: HTTPRequest) -> dict:
    """POST /v1/videos's fields, from a multipart form (what the `openai` client sends) or a JSON object."""
    kind = request.headers.get("content-type", "").lower()
    if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            async with request.form() as form:
                return dict(form.multi_items())  # a file where text belongs fails validation
        except HTTPException as e:  # Starlette's "could not parse the form"
            raise ApiError(400, f"the form could not be read: {e.detail}", code="invalid_value") from None
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object or a multipart form", code="invalid_json")
    return body


def _checked_request(state: ServerState, body: dict) -> VideoRequest:
    try:
        req = VideoRequest.model_validate(body)
    except ValidationError as e:  # the app's handler words it as for any other body
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
    check_common(state, req.model)
    codec = video_codec(state)
    if req.input_reference is not None:
        raise ApiError(400, "input_reference is not supported: this model makes clips from text only",
                       param="input_reference", code="invalid_value")
    seconds = clip_seconds(codec)
    if req.seconds is not None:
        try:
            asked = float(req.seconds)
        except ValueError:
            asked = None
        if asked != seconds:
            raise ApiError(400, f"seconds is '{req.seconds}'; this model makes clips of {seconds:g} s "
                           f"({codec.config.frames} frames at {codec.config.fps:g} fps)", param="seconds",
                           code="invalid_value")
    if req.size not in (None, clip_size(codec)):
        raise ApiError(400, f"size is '{req.size}'; this model makes clips of {clip_size(codec)} (its frame size)",
                       param="size", code="invalid_value")
    return req


@router.post("/v1/videos")
async def create_video(request: HTTPRequest, state: State):
    """Text -> a clip, made before the response (status "completed"), kept for the GETs below. The prompt
    is `<bos> prompt <bov>`, as a chat video answer's."""
    created = int(time.time())
    req = _checked_request(state, await _body(request))
    requests, _ = video_requests(state, req.prompt, 1, req, "prompt")
    handles, updates = submit(state, requests, stream=False)
    (([part], _),) = await collect(state, handles, updates, item="video")
    codec = video_codec(state)
    video = {"id": f"video_{uuid.uuid4().hex}", "object": "video", "model": state.model_name, "status": "completed",
             "progress": 100, "created_at": created, "completed_at": int(time.time()), "expires_at": None,
             "prompt": req.prompt, "seconds": f"{clip_seconds(codec):g}", "size": clip_size(codec),
             "remixed_from_video_id": None, "error": None}
    gif = base64.b64decode(part["video_url"]["url"].split(",", 1)[1])
    state.videos.add(video["id"], StoredVideo(video, gif, list(handles[0].tokens)))
    return video


def _stored(state: ServerState, video_id: str) -> StoredVideo:
    found = state.videos.get(video_id)
    if found is None:
        raise ApiError(404, f"no video '{video_id}' (this server keeps the newest {state.limits.max_stored_videos}, "
                       "in memory)", param="video_id", code="video_not_found")
    return found


@router.get("/v1/videos")
async def list_videos(state: State, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                      order: Literal["asc", "desc"] = "desc"):
    videos = [v.video for v in state.videos.values()]  # oldest first
    if order == "desc":
        videos.reverse()
    if after is not None:
        ids = [v["id"] for v in videos]
        if after not in ids:
            raise ApiError(404, f"after: no video '{after}'", param="after", code="video_not_found")
        videos = videos[ids.index(after) + 1:]
    page = videos[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(videos) > limit}


@router.get("/v1/videos/{video_id}")
async def retrieve_video(video_id: str, state: State):
    return _stored(state, video_id).video


@router.delete("/v1/videos/{video_id}")
async def delete_video(video_id: str, state: State):
    _stored(state, video_id)
    state.videos.pop(video_id)
    return {"id": video_id, "object": "video.deleted", "deleted": True}


@router.get("/v1/videos/{video_id}/content")
async def video_content(video_id: str, state: State, variant: str = "video"):
    """The clip as an animated GIF (OpenAI sends MP4); `thumbnail`: its first frame, `spritesheet`: all its
    frames side by side, both PNG (decoded from the model's codes: a GIF merges repeated frames)."""
    stored = _stored(state, video_id)
    if variant not in VARIANTS:
        raise ApiError(400, f"variant '{variant}' is not supported; use one of {', '.join(VARIANTS)}",
                       param="variant", code="invalid_value")
    if variant == "video":
        return Response(stored.gif, media_type="image/gif")
    return Response(await run_in_threadpool(_still, state, stored.tokens, variant), media_type="image/png")


def _still(state: ServerState, tokens: list[int], variant: str) -> bytes:
    clip = decode_item(state.pipe, "video", tokens)  # (F, S, S, 3)
    buf = io.BytesIO()
    Image.fromarray(clip[0] if variant == "thumbnail" else np.concatenate(list(clip), axis=1)).save(buf, format="PNG")
    return buf.getvalue()
