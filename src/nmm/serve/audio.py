"""The audio routes, POST /v1/audio/transcriptions and POST /v1/audio/speech, and the audio parts of
chat: `input_audio` content parts (read by `input_audio_reader`) and spoken answers (`speech_requests`).

Audio goes through the model's audio codec (nmm.modalities.audio: 16 kHz mono waves <-> codes at
`tokens_per_second`), so an audio item in a prompt is `<boa> codes <eoa>` and a spoken answer is the
codes the model samples after `<boa>`, up to the `<eoa>` it samples itself. Every file is checked
(bytes, readability, samples, duration) before it is decoded, so a long or hostile upload costs
little; docs/server.md lists the limits.
"""

from __future__ import annotations

import base64
import io
import time
import uuid
from types import SimpleNamespace
from typing import Annotated

import numpy as np
import soundfile as sf
from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from nmm.infer.scheduler import Request
from nmm.modalities.audio import SAMPLE_RATE, AudioCodec, read_audio
from nmm.serve.checks import check_common, item_requests, sampling
from nmm.serve.schemas import AUDIO_INPUT_FORMATS, ApiError, InputAudio, SpeechRequest, decode_base64
from nmm.serve.state import ServerState, server
from nmm.serve.streaming import collect, submit

router = APIRouter()
State = Annotated[ServerState, Depends(server)]
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")
SPEECH_FORMATS = ("wav",)  # the codec writes 16-bit PCM WAV; no mp3/opus encoder is bundled
AUDIO_TTL_S = 3600  # `expires_at` of spoken chat answers: nominal, since nothing is kept to refer back to


# ---- reading audio -------------------------------------------------------------------------------
def audio_codec(state: ServerState, param: str | None = None) -> AudioCodec:
    if state.audio is None:
        raise ApiError(400, "this model has no audio modality", param=param, code="audio_not_supported")
    return state.audio


def read_checked(state: ServerState, raw: bytes, param: str) -> tuple[np.ndarray, list[str]]:
    """An audio file's bytes -> (16 kHz mono float32 wave, notes on the conversion), or a 400 naming
    `param`. Size, sample count and duration are read from the header first, so a file that is too
    long is refused before it is decoded (or resampled: a long file at a low rate would grow a lot)."""
    codec, limits = audio_codec(state, param), state.limits
    if len(raw) > limits.max_audio_bytes:
        raise ApiError(400, f"{param}: the audio file is {len(raw)} bytes, more than {limits.max_audio_bytes}",
                       param=param, code="audio_too_large")
    if not raw:
        raise ApiError(400, f"{param}: the audio file is empty (0 bytes)", param=param, code="empty_audio")
    try:
        info = sf.info(io.BytesIO(raw))
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError):  # truncated or foreign: read_audio says so
        info = None
    if info is not None and info.frames == 0:
        raise ApiError(400, f"{param}: the audio file holds no samples", param=param, code="empty_audio")
    longest = codec.config.max_seconds
    if info is not None and info.duration > longest:
        raise ApiError(400, f"{param}: the audio is {info.duration:.2f} s long; this model takes at most "
                       f"{longest:g} s", param=param, code="audio_too_long")
    try:
        wave, notes = read_audio(raw, param)
    except ValueError as e:  # unreadable, truncated, no samples, NaN: read_audio's message says which
        raise ApiError(400, str(e), param=param, code="invalid_audio") from None
    # Resampling may round a clip right at the limit up by a sample; the codec refuses anything longer.
    return wave[: int(longest * SAMPLE_RATE)], notes


def input_audio_reader(state: ServerState):
    """`decode_audio(part, param)` for `prompt_segments`: a chat `input_audio` part -> its wave; None when
    the model has no audio modality (an audio part is then a 400)."""
    if state.audio is None:
        return None
    limit = state.limits.max_audio_bytes

    def decode(part: InputAudio, param: str) -> np.ndarray:
        if part.format.lower() not in AUDIO_INPUT_FORMATS:
            raise ApiError(400, f"{param}.format: '{part.format}' is not supported; use one of "
                           f"{', '.join(AUDIO_INPUT_FORMATS)} (e.g. convert a browser recording to WAV)",
                           param=f"{param}.format", code="invalid_value")
        data = f"{param}.data"
        raw = decode_base64(part.data, limit,
                            ApiError(400, f"{data}: the audio file is larger than {limit} bytes", param=data,
                                     code="audio_too_large"),
                            ApiError(400, f"{data}: not valid base64", param=data, code="invalid_audio"))
        return read_checked(state, raw, data)[0]

    return decode


def audio_tokens(state: ServerState, wave: np.ndarray) -> int:
    """Prompt tokens of one audio item: <boa>, its codes, <eoa>."""
    return state.audio.n_tokens(len(wave)) + 2


# ---- spoken answers ------------------------------------------------------------------------------
def speech_requests(state: ServerState, text: str, n: int, req, param: str) -> tuple[list[Request], int]:
    """n requests for speech of `text` (`item_requests`: prompt `<bos> text <boa>`, audio codes until the
    model samples `<eoa>`, at most the codec's longest item), with CFG only when cfg_scale != 1 (default 1,
    as `Pipeline.speak`). Returns them and the prompt's length."""
    audio_codec(state, param)
    if not state.can_speak:
        raise ApiError(400, f"this model cannot generate audio (a model with {state.pipe.model.cfg.audio_variant} audio reads audio "
                       "and writes text)", param=param, code="audio_not_supported")
    if not text.strip():
        raise ApiError(400, f"{param}: there is no text to speak", param=param, code="invalid_value")
    return item_requests(state, "audio", text, n, req, param, cfg_default=1.0, what="speech")


def answer_audio(wav_b64: str, transcript: str) -> dict:
    """`message.audio` of a spoken chat answer, as OpenAI's."""
    return {"id": f"audio_{uuid.uuid4().hex}", "data": wav_b64, "expires_at": int(time.time()) + AUDIO_TTL_S,
            "transcript": transcript}


# ---- routes --------------------------------------------------------------------------------------
@router.post("/v1/audio/transcriptions")
async def transcriptions(state: State, file: Annotated[UploadFile, File()],
                         model: Annotated[str | None, Form()] = None,
                         response_format: Annotated[str, Form()] = "json",
                         temperature: Annotated[float | None, Form(ge=0, le=1)] = None):
    """Speech -> text: `<bos> <boa> codes <eoa>` and the transcript the model writes after it. `language`
    and `prompt` are accepted and ignored (the model knows one language and takes no prompt)."""
    check_common(state, model)
    audio_codec(state, "file")
    if response_format not in TRANSCRIPTION_FORMATS:
        raise ApiError(400, f"response_format '{response_format}' is not supported; use one of "
                       f"{', '.join(TRANSCRIPTION_FORMATS)}", param="response_format", code="invalid_value")
    raw = await file.read()  # the Gate has capped the whole body at max_body_bytes already
    wave, notes = await run_in_threadpool(read_checked, state, raw, "file")
    prompt_tokens = audio_tokens(state, wave) + 1
    room = state.context - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the audio is {prompt_tokens} tokens, the model's whole context", param="file",
                       code="context_length_exceeded")
    prompt = await run_in_threadpool(state.pipe.codecs.prompt, [("audio", wave)])
    settings = SimpleNamespace(temperature=temperature, seed=None)  # what `sampling` reads
    request = Request(prompt, min(state.limits.default_max_tokens, room), sampling(settings, 0.0, 0),
                      allow_images=False)
    ((text, _),) = await collect(state, *submit(state, [request], stream=False))
    text = text.strip()
    headers = {"X-Audio-Notes": "; ".join(notes)} if notes else None
    if response_format == "text":
        return PlainTextResponse(text, headers=headers)
    if response_format == "json":
        return JSONResponse({"text": text}, headers=headers)
    duration = round(len(wave) / SAMPLE_RATE, 3)
    segment = {"id": 0, "seek": 0, "start": 0.0, "end": duration, "text": text, "tokens": [],
               "temperature": settings.temperature or 0.0, "avg_logprob": 0.0, "compression_ratio": 1.0,
               "no_speech_prob": 0.0}
    return JSONResponse({"task": "transcribe", "language": "en", "duration": duration, "text": text,
                         "segments": [segment], "notes": notes}, headers=headers)


@router.post("/v1/audio/speech")
async def speech(req: SpeechRequest, state: State):
    """Text -> a WAV body: the codes the model writes after `<bos> input <boa>`, decoded by the codec."""
    check_common(state, req.model)
    audio_codec(state)
    if req.response_format not in (None, *SPEECH_FORMATS):
        raise ApiError(400, f"response_format '{req.response_format}' is not supported; use 'wav'",
                       param="response_format", code="invalid_value")
    if req.speed is not None and req.speed != 1:
        raise ApiError(400, f"speed is {req.speed:g}; this model speaks at one rate (speed 1)", param="speed",
                       code="invalid_value")
    requests, _ = speech_requests(state, req.input, 1, req, "input")
    ((wav_b64, _),) = await collect(state, *submit(state, requests, stream=False), item="audio")
    return Response(base64.b64decode(wav_b64), media_type="audio/wav")

