"""Imported checkpoints behind `nmm serve`, as a client meets them: a tiny random Chameleon and a tiny
random Emu3 (built by transformers, imported with nmm.interop), each served by nmm's FastAPI app on a
live uvicorn server and called with the official `openai` client.

Both answer chat completions with text and with an image in the prompt, and their greedy answers are
exactly what `nmm.load(run)` gives for the same prompt (the server's image reader hands the codec the
same pixels for a picture already at the model's size). Emu3 also answers with pictures (its VQ-VAE has a
decoder). Chameleon's transformers checkpoint has no VQ decoder, so it cannot: the server should say so
before it generates (see `test_chameleon_picture_request_is_refused_up_front`).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import nmm
from nmm.interop import import_hf
from nmm.serve import create_app

QUESTION = "what colour is the circle?"


def _emu3_builders():
    """tests/interop/test_emu3.py's tiny-Emu3 builder (test modules are not importable by name under
    --import-mode=importlib, and a conftest is not ours to extend here)."""
    spec = importlib.util.spec_from_file_location("_nmm_test_emu3_builders", Path(__file__).with_name("test_emu3.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SHARED


@contextlib.contextmanager
def live(app):
    """uvicorn serving `app` on a free port of 127.0.0.1, in a thread (as tests/serve/conftest.py does)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def png_url(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def png_of(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def check_text_chats(client, name: str, pipe, image: np.ndarray) -> None:
    """A text chat and a chat with one image: greedy answers equal the pipeline's for the same prompt."""
    reply = client.chat.completions.create(model=name, messages=user(QUESTION), max_tokens=8, temperature=0)
    expected = pipe.complete_text([pipe.codecs.prompt([QUESTION])], max_new_tokens=8)[0]
    assert reply.choices[0].message.content.strip() == expected and reply.usage.completion_tokens >= 1
    parts = [{"type": "image_url", "image_url": {"url": png_url(image)}}, {"type": "text", "text": QUESTION}]
    reply = client.chat.completions.create(model=name, messages=user(parts), max_tokens=8, temperature=0)
    prompt = pipe.codecs.prompt([("image", image), QUESTION])
    assert reply.usage.prompt_tokens == len(prompt) == 1 + pipe.vocab.tokens_per_image + 2 + len(
        pipe.codecs.encode_text(QUESTION))
    assert reply.choices[0].message.content.strip() == pipe.complete_text([prompt], max_new_tokens=8)[0]
    stream = client.chat.completions.create(model=name, messages=user(parts), max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip() == \
        reply.choices[0].message.content.strip()


# ---- Chameleon ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chameleon_served(imported):
    run = imported[0]
    pipe = nmm.load(run, device="cpu")
    with live(create_app(pipe, "chameleon-tiny")) as url:
        yield pipe, openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def test_chameleon_chat_with_text_and_an_image(chameleon_served, tiny):
    pipe, client = chameleon_served
    assert [m.id for m in client.models.list()] == ["chameleon-tiny"]
    card = client.models.retrieve("chameleon-tiny")
    assert card.model_extra["image_size"] == tiny.resolution and card.model_extra["context_length"] == 320
    rng = np.random.default_rng(0)
    check_text_chats(client, "chameleon-tiny", pipe, rng.integers(0, 256, (tiny.resolution, tiny.resolution, 3),
                                                                  dtype=np.uint8))


def test_chameleon_picture_request_is_refused_up_front(chameleon_served):
    _, client = chameleon_served
    with pytest.raises(openai.BadRequestError, match="decoder|cannot generate images"):
        client.chat.completions.create(model="chameleon-tiny", messages=user("draw a small red circle"))


# ---- Emu3 --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emu3_served(tmp_path_factory):
    shared = _emu3_builders()
    root = tmp_path_factory.mktemp("emu3-serve")
    shared.build(root / "hf", seed=1, shard="2MB")
    import_hf(root / "hf", root / "emu3-tiny", dtype="fp32")
    pipe = nmm.load(root / "emu3-tiny", device="cpu")
    with live(create_app(pipe, "emu3-tiny")) as url:
        yield pipe, openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120), shared


def test_emu3_chat_with_text_and_an_image(emu3_served):
    pipe, client, shared = emu3_served
    card = client.models.retrieve("emu3-tiny")
    assert card.model_extra["image_size"] == shared.resolution == pipe.codecs.image.config.image_size
    check_text_chats(client, "emu3-tiny", pipe, shared.picture(0))


def test_emu3_answers_with_pictures(emu3_served):
    """A chat picture answer and the images API: PNGs at the run's size, decoded by Emu3's VQ decoder. A
    greedy picture (CFG 2, as Pipeline.generate_images) is the pipeline's picture for the same caption."""
    pipe, client, shared = emu3_served
    R = shared.resolution
    drawn = client.chat.completions.create(model="emu3-tiny", messages=user("draw a small red circle"), temperature=0)
    part = drawn.choices[0].message.content[0]  # a list of content parts, passed through by the client
    assert part["type"] == "image_url"
    picture = png_of(part["image_url"]["url"])
    assert picture.shape == (R, R, 3)
    assert drawn.usage.completion_tokens == pipe.vocab.tokens_per_image + 1
    expected = pipe.generate_images(["a small red circle"], cfg_scale=2.0, temperature=0.0)[0]
    assert np.array_equal(picture, expected)
    images = client.images.generate(model="emu3-tiny", prompt="a large blue square", n=1, size=f"{R}x{R}",
                                    response_format="b64_json")
    assert png_of("data:image/png;base64," + images.data[0].b64_json).shape == (R, R, 3)
