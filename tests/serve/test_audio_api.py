"""The audio API against a live server, with the official `openai` client: transcriptions, speech, chat
with `input_audio` parts and spoken chat answers (plain and streamed), and every audio limit as a 4xx.

The server runs speech-tiny with random weights, so transcripts are gibberish and speech may be empty
(the model may sample `<eoa>` at once): the tests check shapes and formats, and that greedy answers are
exactly what the `Pipeline` gives for the same audio.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from nmm.modalities.audio import read_audio
from nmm.serve import Limits, create_app

MAX_AUDIO_BYTES = 200_000  # a 6 s clip at 16 kHz, 16 bit, is 192 kB: it fits; bigger uploads are refused


def wav_bytes(seconds: float, rate: int = 16_000, channels: int = 1, subtype: str = "PCM_16") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * np.linspace(0, 1, len(t))
    buf = io.BytesIO()
    sf.write(buf, np.stack([wave] * channels, 1), rate, subtype=subtype, format="WAV")
    return buf.getvalue()


CLIP = wav_bytes(1.0)


@pytest.fixture(scope="module")
def speech_server(served_speech, live):
    with live(create_app(*served_speech, limits=Limits(max_audio_bytes=MAX_AUDIO_BYTES))) as url:
        yield url


@pytest.fixture(scope="module")
def shapes_server(served, live):
    with live(create_app(*served)) as url:
        yield url


@pytest.fixture(scope="module")
def client(speech_server):
    return openai.OpenAI(base_url=speech_server + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected_transcript(pipe, data: bytes, max_new_tokens: int) -> str:
    return pipe.transcribe([read_audio(data)[0]], max_new_tokens=max_new_tokens)[0]


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def parse_wav(data: bytes) -> np.ndarray:
    wave, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 16_000 and wave.ndim == 1
    return wave


# ---- transcriptions ------------------------------------------------------------------------------
def test_transcription_formats(client, served_speech, speech_server):
    pipe, name = served_speech
    expected = expected_transcript(pipe, CLIP, 64)  # greedy, the server's default 64 tokens
    as_json = client.audio.transcriptions.create(model=name, file=("clip.wav", CLIP, "audio/wav"))
    assert as_json.text == expected
    as_text = client.audio.transcriptions.create(model=name, file=("clip.wav", CLIP), response_format="text")
    assert as_text == expected
    stereo = wav_bytes(1.5, rate=22_050, channels=2)
    verbose = client.audio.transcriptions.create(model=name, file=("s.wav", stereo), response_format="verbose_json")
    assert verbose.language == "en" and verbose.duration == pytest.approx(1.5, abs=1e-3)
    assert len(verbose.segments) == 1 and verbose.segments[0].end == verbose.duration
    assert verbose.text == verbose.segments[0].text == expected_transcript(pipe, stereo, 64)
    assert verbose.model_extra["notes"] == ["mixed 2 channels down to mono", "resampled 22050 -> 16000 Hz"]
    r = httpx.post(speech_server + "/v1/audio/transcriptions", files={"file": ("s.wav", stereo)})
    assert r.status_code == 200 and "resampled 22050 -> 16000 Hz" in r.headers["x-audio-notes"]


# ---- speech ----------------------------------------------------------------------------------------
def test_speech_is_a_wav(client, served_speech):
    pipe, name = served_speech
    reply = client.audio.speech.create(model=name, voice="alloy", input="she draws the big house again",
                                       response_format="wav")
    assert reply.response.headers["content-type"] == "audio/wav"
    wave = parse_wav(reply.content)  # random weights may end the item at once: an empty WAV is valid
    assert len(wave) <= pipe.codecs.modalities["audio"].config.max_seconds * 16_000 + 16_000
    # Without response_format (OpenAI's default would be mp3) the answer is a WAV too, and any voice goes.
    parse_wav(client.audio.speech.create(model=name, voice="any-name", input="zero").content)


# ---- chat ----------------------------------------------------------------------------------------
def test_chat_with_input_audio(client, served_speech):
    pipe, name = served_speech
    reply = client.chat.completions.create(model=name, max_tokens=12, messages=[
        {"role": "user", "content": [audio_part(CLIP)]}])
    assert reply.choices[0].message.content == expected_transcript(pipe, CLIP, 12)
    assert reply.usage.prompt_tokens == 1 + pipe.codecs.modalities["audio"].n_tokens(16_000) + 2


def test_chat_answers_with_speech(client, served_speech):
    _, name = served_speech
    reply = client.chat.completions.create(model=name, modalities=["text", "audio"], seed=3,
                                           audio={"voice": "alloy", "format": "wav"},
                                           messages=[{"role": "user", "content": "water"}])
    message = reply.choices[0].message
    assert message.content is None and message.audio.transcript == "water"
    assert message.audio.id.startswith("audio_") and message.audio.expires_at > reply.created
    wave = parse_wav(base64.b64decode(message.audio.data))
    assert reply.usage.completion_tokens >= 1 + (len(wave) > 0)  # its codes and <eoa>


def test_chat_streams_speech(client, served_speech):
    _, name = served_speech
    chunks = list(client.chat.completions.create(
        model=name, modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}, stream=True,
        seed=3, stream_options={"include_usage": True}, messages=[{"role": "user", "content": "zero"}]))
    audio = [c.choices[0].delta.audio for c in chunks if c.choices]  # the client's ChoiceDeltaAudio
    assert audio[0].transcript == "zero" and audio[0].id.startswith("audio_")
    data = [a.data for a in audio if a and a.data is not None]
    assert len(data) == 1
    parse_wav(base64.b64decode(data[0]))
    assert any(a and a.expires_at and a.data is None and a.id is None for a in audio)  # the last audio delta
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens >= 1


# ---- limits --------------------------------------------------------------------------------------
def truncated_wav() -> bytes:
    return CLIP[:30]  # cut inside the header


def empty_wav() -> bytes:
    return wav_bytes(0.0)


UPLOADS = [  # (file bytes, code, what the message says)
    (wav_bytes(2.5, rate=48_000), "audio_too_large", f"more than {MAX_AUDIO_BYTES}"),
    (wav_bytes(7.0, rate=8_000), "audio_too_long", "7.00 s long; this model takes at most 6 s"),
    (truncated_wav(), "invalid_audio", "not a readable audio file"),
    (b"not audio at all" * 10, "invalid_audio", "not a readable audio file"),
    (b"", "empty_audio", "empty (0 bytes)"),
    (empty_wav(), "empty_audio", "holds no samples"),
]


def assert_error(r: httpx.Response, status: int, code: str, text: str, param: str | None = "?") -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and text in error["message"], error
    if param != "?":
        assert error["param"] == param, error


@pytest.mark.parametrize("data, code, text", UPLOADS)
def test_bad_uploads(speech_server, data, code, text):
    r = httpx.post(speech_server + "/v1/audio/transcriptions", files={"file": ("a.wav", data)}, timeout=30)
    assert_error(r, 400, code, text, "file")
    assert r.json()["error"]["message"].startswith("file")


@pytest.mark.parametrize("data, code, text", UPLOADS[1:])  # base64 of a too-large file is caught by size first
def test_bad_input_audio(speech_server, data, code, text):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, audio_part(data)]}]}
    r = httpx.post(speech_server + "/v1/chat/completions", json=body, timeout=30)
    assert_error(r, 400, code, text, "messages[0].content[1].input_audio.data")


def test_request_errors(speech_server, client):
    url = speech_server
    def post(path, **kw):
        return httpx.post(url + path, timeout=30, **kw)

    assert_error(post("/v1/audio/transcriptions", files={"file": ("a.wav", CLIP)}, data={"response_format": "srt"}),
                 400, "invalid_value", "use one of json, text, verbose_json", "response_format")
    assert_error(post("/v1/audio/transcriptions", data={"model": "x"}), 400, "invalid_value", "file", "file")
    assert_error(post("/v1/audio/transcriptions", files={"file": ("a.wav", CLIP)}, data={"model": "other"}),
                 404, "model_not_found", "does not exist", "model")
    assert_error(post("/v1/audio/transcriptions", files={"file": ("a.wav", CLIP)}, data={"temperature": "3"}),
                 400, "invalid_value", "temperature", "temperature")
    assert_error(post("/v1/audio/speech", json={"input": "hi", "response_format": "mp3"}), 400, "invalid_value",
                 "'mp3' is not supported; use 'wav'", "response_format")
    assert_error(post("/v1/audio/speech", json={"input": "hi", "speed": 2}), 400, "invalid_value",
                 "one rate", "speed")
    assert_error(post("/v1/audio/speech", json={"input": ""}), 400, "invalid_value", "input", "input")
    assert_error(post("/v1/audio/speech", json={"input": "the big house " * 200}), 400,
                 "context_length_exceeded", "exceeds the model's context", "input")
    chat = "/v1/chat/completions"
    assert_error(post(chat, json={"messages": [{"role": "user", "content": [audio_part(CLIP, "webm")]}]}), 400,
                 "invalid_value", "'webm' is not supported; use one of wav, mp3, flac, ogg",
                 "messages[0].content[0].input_audio.format")
    bad_base64 = {"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}
    assert_error(post(chat, json={"messages": [{"role": "user", "content": [bad_base64]}]}), 400, "invalid_audio",
                 "not valid base64", "messages[0].content[0].input_audio.data")
    assert_error(post(chat, json={"messages": [{"role": "user", "content": [audio_part(CLIP)] * 5}]}), 400,
                 "too_many_audio", "5 audio items; at most 4", "messages")
    assert_error(post(chat, json={"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"],
                                  "audio": {"voice": "alloy", "format": "mp3"}}),
                 400, "invalid_value", "'mp3' is not supported", "audio.format")
    assert_error(post(chat, json={"messages": [{"role": "user", "content": [audio_part(CLIP)]}],
                                  "modalities": ["audio"]}), 400, "invalid_value", "no text to speak", "messages")
    assert_error(post(chat, json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
        400, "images_not_supported", "this model has no image modality", "messages")
    # The openai client raises on these as on any 4xx.
    with pytest.raises(openai.BadRequestError, match="this model speaks at one rate"):
        client.audio.speech.create(model="speech-tiny-random", voice="alloy", input="hi", speed=1.5)


def test_a_model_without_audio(shapes_server):
    def post(path, **kw):
        return httpx.post(shapes_server + path, timeout=30, **kw)

    refusals = [
        post("/v1/audio/transcriptions", files={"file": ("a.wav", CLIP)}),
        post("/v1/audio/speech", json={"input": "hi", "voice": "alloy"}),
        post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [audio_part(CLIP)]}]}),
        post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                           "modalities": ["text", "audio"]}),
    ]
    for r in refusals:
        assert_error(r, 400, "audio_not_supported", "this model has no audio modality")
