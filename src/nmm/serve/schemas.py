"""What the HTTP server accepts and how a request becomes a prompt: request bodies in OpenAI's shapes,
the limits, the error type, data URLs (images here), and the chat -> nmm document rules (audio and
video inputs are decoded by nmm.serve.audio and nmm.serve.video, handed in as `decode_audio` and
`decode_video`).

Every way a request can be wrong ends as an `ApiError`, which the app turns into a 4xx in OpenAI's
error shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from nmm.modalities.document import ItemSegment

IMAGE_TRIGGERS = ("generate an image", "draw", "show me")  # a last user text starting so asks for a picture
# With an image (audio, video), these texts mean "caption (transcribe) it", as `nmm generate`: the text is left out.
DESCRIBE = ("", "describe", "caption", "transcribe")
AUDIO_INPUT_FORMATS = ("wav", "mp3", "flac", "ogg")  # what libsndfile reads; webm / m4a are not among them


@dataclass(frozen=True)
class Limits:
    """How much one request may ask for, and how much the server takes on at once. Anything beyond is a
    clear 4xx (or 429 for a full queue), never a 5xx."""

    max_body_bytes: int = 8 * 2**20  # whole request body -> 413
    max_tokens: int = 256  # largest max_tokens a request may ask for -> 400
    default_max_tokens: int = 64  # used when a request gives none (capped by the context)
    max_images: int = 4  # input images per request -> 400
    max_image_bytes: int = 4 * 2**20  # one decoded image file -> 400
    max_image_pixels: int = 4096 * 4096  # width * height of one input image -> 400
    max_audios: int = 4  # input audio items per chat request -> 400
    max_audio_bytes: int = 4 * 2**20  # one audio file (upload or decoded input_audio) -> 400
    # The longest audio is the model's: its codec's max_seconds (longer -> 400, before decoding it).
    max_videos: int = 2  # input video items per chat request -> 400
    max_video_bytes: int = 4 * 2**20  # one video file (decoded from its data URL) -> 400
    # A video file is read whole before it is resampled to the codec's frames, so these bound that work:
    max_video_frames: int = 600  # frames in one file, before resampling -> 400
    max_video_pixels: int = 64 * 2**20  # frames * width * height of one file, before resampling -> 400
    max_video_seconds: float = 60.0  # duration of one file, where the file says it -> 400
    max_stored_videos: int = 64  # /v1/videos results kept in memory for GET; the oldest goes first
    max_n: int = 4  # choices (chat) or images (images API) per request -> 400
    max_queue: int = 16  # requests (choices) waiting for a row of the running batch; one more -> 429
    max_batch: int = 32  # rows decoded together by the scheduler (a CFG image takes two)
    max_cache_mb: float | None = None  # KV-cache memory cap; fewer rows if max_batch rows would not fit


class ApiError(Exception):
    """A request the server refuses, with OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request bodies ------------------------------------------------------------------------------
class _Body(BaseModel):
    # Unknown fields (user, stop, logprobs, ...) are accepted and ignored, as OpenAI clients send many.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(_Body):
    type: Literal["text"]
    text: str = Field(max_length=100_000)


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Body):
    data: str  # base64 of the file's bytes
    format: str


class AudioPart(_Body):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(_Body):
    url: str  # data:video/mp4;base64,... or data:image/gif;base64,...


class VideoPart(_Body):
    """nmm's extension: a video, in the shape of `image_url` (OpenAI's chat has no video part)."""

    type: Literal["video_url"]
    video_url: VideoURL


Part = Annotated[TextPart | ImagePart | AudioPart | VideoPart, Field(discriminator="type")]
Content = Annotated[str, Field(max_length=100_000)] | Annotated[list[Part], Field(max_length=64)] | None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    """Sampling fields shared by both generation routes; top_k and cfg_scale are nmm extensions."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    cfg_scale: float | None = Field(None, ge=0, le=20)  # classifier-free guidance for image tokens
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1)


class AudioOutput(_Body):
    """`audio` of a chat request asking for speech (`modalities: ["text", "audio"]`)."""

    voice: str | None = Field(None, max_length=64)  # any name: the model has one voice family
    format: str = "wav"


class ChatRequest(Sampling):
    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, ge=0.1, le=10)
    # Fixed-length answers, as vLLM names them: no <eos> before min_tokens, or none at all.
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    modalities: list[str] | None = Field(None, max_length=8)
    audio: AudioOutput | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ItemSampling(_Body):
    """nmm's sampling extensions, as in chat, for the routes that make one item (speech, a video)."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_k: int | None = Field(None, ge=1, le=1_000_000)
    top_p: float | None = Field(None, gt=0, le=1)
    cfg_scale: float | None = Field(None, ge=0, le=20)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class SpeechRequest(ItemSampling):
    """POST /v1/audio/speech. `voice` is required by OpenAI; any name is accepted here (one voice family)."""

    input: str = Field(min_length=1, max_length=4096)
    model: str | None = None
    voice: str | None = Field(None, max_length=64)
    response_format: str | None = None  # wav only
    speed: float | None = None  # 1 only: the model has no rate control


class VideoRequest(ItemSampling):
    """POST /v1/videos (JSON or multipart form, as the `openai` client sends it). `seconds` and `size`
    must be the model's own (or absent); `input_reference` is refused (clips are made from text only)."""

    prompt: str = Field(max_length=4000)
    model: str | None = None
    seconds: str | float | None = None
    size: str | None = None
    input_reference: Any = None


class ImageRequest(Sampling):
    prompt: str = Field(max_length=4000)
    model: str | None = None
    response_format: str | None = None
    size: str | None = None


# ---- files in requests ---------------------------------------------------------------------------
def decode_base64(data: str, max_bytes: int, too_large: ApiError, invalid: ApiError) -> bytes:
    """Base64 text -> the file's bytes; `too_large` when they would be more than `max_bytes` (judged from
    the text's length first, so an oversized file is refused before it is decoded), `invalid` when the
    text is not base64."""
    if len(data) > max_bytes * 4 // 3 + 4:
        raise too_large
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid from None
    if len(raw) > max_bytes:
        raise too_large
    return raw


def data_url_bytes(url: str, kind: str, accepts: tuple[str, ...], example: str, max_bytes: int, param: str) -> bytes:
    """A ``data:MIME;base64,...`` URL of a `kind` part ("image", "video") -> its bytes. `accepts`: the MIME
    types taken ("image/*" takes a whole family); `example` (e.g. "image/png") shows the shape in errors.
    Remote URLs are refused, never fetched. The errors are `invalid_{kind}_url` and `{kind}_too_large`."""
    field, bad_url = f"{kind}_url", f"invalid_{kind}_url"
    example = f"data:{example};base64,..."
    header, comma, payload = url.partition(",")
    if not header.lower().startswith("data:"):
        raise ApiError(400, f"{field} must be a data URL ({example}); remote URLs are not fetched", param=param,
                       code=bad_url)
    mime = header[5:].split(";")[0].strip().lower()
    taken = any(mime.startswith(a[:-1]) if a.endswith("*") else mime == a for a in accepts)
    if not comma or ";base64" not in header.lower() or not taken:
        raise ApiError(400, f"{field} must be a base64 data URL of type {' or '.join(accepts)}, like {example}",
                       param=param, code=bad_url)
    too_big = ApiError(400, f"{param}: the {kind} file is larger than {max_bytes} bytes", param=param,
                       code=f"{kind}_too_large")
    invalid = ApiError(400, f"{param}: the data is not valid base64", param=param, code=bad_url)
    return decode_base64(payload, max_bytes, too_big, invalid)


def decode_image_url(url: str, limits: Limits, size: int, param: str) -> np.ndarray:
    """A ``data:image/...;base64,...`` URL -> (size, size, 3) uint8, resized the way training data is."""
    raw = data_url_bytes(url, "image", ("image/*",), "image/png", limits.max_image_bytes, param)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.width * image.height > limits.max_image_pixels:
                raise ApiError(400, f"image has {image.width}x{image.height} pixels, more than "
                               f"{limits.max_image_pixels}", param=param, code="image_too_large")
            image = ImageOps.exif_transpose(image).convert("RGB")
            if image.size != (size, size):  # as nmm.data.folder.load_image: squash, never crop
                exact = image.size[0] % size == 0 and image.size[1] % size == 0
                image = image.resize((size, size), Image.Resampling.BOX if exact else Image.Resampling.LANCZOS)
            return np.asarray(image, dtype=np.uint8)
    except ApiError:
        raise
    except Exception:  # Pillow raises many exception types on hostile bytes; all mean "not an image"
        raise ApiError(400, "image_url: the data is not a readable image", param=param,
                       code="invalid_image") from None


# ---- requests -> prompts ------------------------------------------------------------------------
def prompt_segments(messages: list[Message], encode_text: Callable[[str], list[int]], limits: Limits,
                    size: int | None, decode_audio: Callable[[InputAudio, str], np.ndarray] | None = None,
                    decode_video: Callable[[VideoURL, str], ItemSegment] | None = None):
    """Messages -> prompt segments [("text", ids) | ("image", (H, W, 3) uint8) | ("audio", 1-D float32) |
    ItemSegment("video", codes=ids)] and the last user text. `size` None: the model has no image modality;
    `decode_audio(part, param)` / `decode_video(part, param)` None: no audio / video modality (such a part
    is then a 400). Videos come encoded: a clip's length in tokens is only known once it is.

    System and developer messages are skipped (the model has no instructions); in every other turn,
    images come first as `<boi> codes <eoi>`, then audio as `<boa> codes <eoa>`, then videos as
    `<bov> codes <eov>`, then the text, as in nmm's training documents."""
    checks = (("image_url", "images", limits.max_images, "image", size is not None, "images_not_supported",
               "too_many_images"),
              ("input_audio", "audio items", limits.max_audios, "audio", decode_audio is not None,
               "audio_not_supported", "too_many_audio"),
              ("video_url", "videos", limits.max_videos, "video", decode_video is not None, "video_not_supported",
               "too_many_videos"))
    for kind, noun, most, modality, readable, unsupported, too_many in checks:
        count = sum(p.type == kind for m in messages if isinstance(m.content, list) for p in m.content)
        if count and not readable:
            raise ApiError(400, f"this model has no {modality} modality", param="messages", code=unsupported)
        if count > most:
            raise ApiError(400, f"the request has {count} {noun}; at most {most}", param="messages", code=too_many)
    segments, last_user = [], ""
    for i, m in enumerate(messages):
        if m.role in ("system", "developer") or m.content is None:
            continue
        parts = m.content if isinstance(m.content, list) else []
        texts = [m.content] if isinstance(m.content, str) else [p.text for p in parts if p.type == "text"]
        items = [("image", decode_image_url(p.image_url.url, limits, size, f"messages[{i}].content[{j}].image_url.url"))
                 for j, p in enumerate(parts) if p.type == "image_url"]
        items += [("audio", decode_audio(p.input_audio, f"messages[{i}].content[{j}].input_audio"))
                  for j, p in enumerate(parts) if p.type == "input_audio"]
        items += [decode_video(p.video_url, f"messages[{i}].content[{j}].video_url.url")
                  for j, p in enumerate(parts) if p.type == "video_url"]
        text = " ".join(t.strip() for t in texts if t.strip())
        segments += items
        if text and not (items and text.lower() in DESCRIBE):
            segments.append(("text", encode_text(text)))
        if m.role == "user":
            last_user = text
    return segments, last_user


def picture_caption(last_user: str, modalities: list[str] | None, triggers: bool = True) -> str | None:
    """What to draw if the request asks for a picture, else None. `triggers` False: only `modalities`
    asks (for a model without images, "draw ..." is just text)."""
    lowered = last_user.lower()
    for trigger in IMAGE_TRIGGERS if triggers else ():
        if lowered.startswith(trigger):
            return re.sub(r"^\s*[:,]?\s*(of |me )?", "", last_user[len(trigger):], flags=re.I).strip()
    return last_user if modalities and "image" in modalities else None


def token_budget(req: ChatRequest, prompt_tokens: int, context: int, limits: Limits) -> int:
    asked = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    if asked is not None and asked > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {asked}; this server allows at most {limits.max_tokens}",
                       param="max_tokens", code="invalid_value")
    room = context - prompt_tokens
    if room < 1 or (asked is not None and asked > room):
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens and the model's context is {context}, so at "
                       f"most {max(room, 0)} new tokens fit", param="max_tokens", code="context_length_exceeded")
    return asked if asked is not None else min(limits.default_max_tokens, room)
