"""The HTTP server, as clients meet it: the OpenAI routes through TestClient and the official `openai`
client against a live uvicorn server, every limit's 4xx, and a fuzz of malformed requests (never a 5xx).

The model has random weights (built from the shapes-tiny preset in about a second), so answers are
gibberish; the tests check formats, limits and plumbing, not quality.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import time

import numpy as np
import pytest
from PIL import Image

from fastapi.testclient import TestClient

from nmm.data.shapes import ShapesWorld
from nmm.infer.scheduler import Request
from nmm.serve import Limits, create_app, load_pipeline
from nmm.serve.schemas import picture_caption

CHAT, IMAGES = "/v1/chat/completions", "/v1/images/generations"


@pytest.fixture(scope="module")
def client(served):
    return TestClient(create_app(*served))


def make_client(served, **kw) -> TestClient:
    limits = kw.pop("limits", Limits())
    return TestClient(create_app(*served, limits=limits, **kw), raise_server_exceptions=False)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def scene_url() -> str:
    world = ShapesWorld()
    return data_url(png_bytes(world.render(world.scenes(1, seed=3)[0])))


def decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


def error_of(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# ---- routes --------------------------------------------------------------------------------------
def test_models_health_and_playground(client, served):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [served[1]] == ["shapes-tiny-random"]
    assert models["data"][0]["image_size"] == 32 and models["data"][0]["context_length"] == 160
    assert client.get(f"/v1/models/{served[1]}").json()["id"] == served[1]
    assert client.get("/health").json() == {"status": "ok", "model": served[1]}
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


def test_chat_text(client, served):
    r = client.post(CHAT, json={"model": served[1], "messages": user("what colour is the circle?"), "max_tokens": 6,
                                "temperature": 0.8, "top_p": 0.9, "seed": 1})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 6 + 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # n choices; system messages are not part of the prompt
    r = client.post(CHAT, json={"messages": [{"role": "system", "content": "be nice"}, *user("what colour?")],
                                "n": 2, "max_tokens": 3})
    assert len(r.json()["choices"]) == 2
    plain = client.post(CHAT, json={"messages": user("what colour?"), "max_tokens": 3}).json()
    assert r.json()["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_chat_with_image(client, served):
    pipe = served[0]
    question = "what colour is the circle?"
    parts = [{"type": "image_url", "image_url": {"url": scene_url()}}, {"type": "text", "text": question}]
    r = client.post(CHAT, json={"messages": user(parts), "max_tokens": 4})
    assert r.status_code == 200, r.text
    image_block = pipe.vocab.tokens_per_image + 2
    assert r.json()["usage"]["prompt_tokens"] == 1 + image_block + len(pipe.codecs.encode_text(question))
    # "describe" with an image means "caption it": the prompt is just <bos> <boi> codes <eoi>
    parts[1]["text"] = "describe"
    r = client.post(CHAT, json={"messages": user(parts), "max_tokens": 4})
    assert r.json()["usage"]["prompt_tokens"] == 1 + image_block


@pytest.mark.parametrize("request_extra", [{"messages": user("draw a small red circle at the top left")},
                                           {"messages": user("a red circle"), "modalities": ["text", "image"]}])
def test_chat_answers_with_an_image(client, request_extra):
    body = client.post(CHAT, json=request_extra).json()
    content = body["choices"][0]["message"]["content"]
    assert isinstance(content, list) and content[0]["type"] == "image_url"
    url = content[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert decode_png(url.split(",", 1)[1]).size == (32, 32)
    assert body["usage"]["completion_tokens"] == 64 + 1


def test_picture_caption_rule():
    assert picture_caption("Draw a red circle", None) == "a red circle"
    assert picture_caption("generate an image of a blue square", None) == "a blue square"
    assert picture_caption("show me: a green cross", None) == "a green cross"
    assert picture_caption("what is drawn here?", None) is None
    assert picture_caption("a red circle", ["image"]) == "a red circle"


def test_images_generation(client, served):
    r = client.post(IMAGES, json={"model": served[1], "prompt": "a small red circle at the top left", "n": 2,
                                  "size": "32x32", "response_format": "b64_json", "cfg_scale": 3.0, "seed": 0})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2
    for item in data:
        image = decode_png(item["b64_json"])
        assert image.size == (32, 32) and image.mode == "RGB"


@pytest.mark.parametrize("preset", ["shapes-tiny-late", "shapes-tiny-mid"])
def test_models_that_cannot_draw_say_so(preset):
    """Late and mid fusion read images and write text: a picture request is a 400 that says so, while chat
    about an image (mid fusion: through the scheduler's per-row cross-attention memory) works."""
    pipe, name = load_pipeline(preset)
    assert "M2G" not in pipe.model.images.capabilities
    c = TestClient(create_app(pipe, name))
    error = error_of(c.post(IMAGES, json={"prompt": "a red circle"}), 400, "images_not_supported")
    assert "cannot generate images" in error["message"]
    error_of(c.post(CHAT, json={"messages": user("draw a red circle")}), 400, "images_not_supported")
    error_of(c.post(CHAT, json={"messages": user("a red circle"), "modalities": ["image"], "stream": True}), 400,
             "images_not_supported")
    parts = [{"type": "image_url", "image_url": {"url": scene_url()}}, {"type": "text", "text": "what colour?"}]
    r = c.post(CHAT, json={"messages": user(parts), "max_tokens": 4, "n": 2})
    assert r.status_code == 200, r.text
    assert all(isinstance(ch["message"]["content"], str) for ch in r.json()["choices"])


def test_continuous_images_come_from_the_flow_sampler():
    """A continuous-image model has no code head (the scheduler never offers it <boi>): its pictures come from
    Pipeline's flow sampler, through the same routes and formats."""
    pipe, name = load_pipeline("shapes-tiny-continuous")
    assert not pipe.model.images.emits_codes and "M2G" in pipe.model.images.capabilities
    c = TestClient(create_app(pipe, name))
    r = c.post(IMAGES, json={"prompt": "a small red circle at the top left", "n": 2, "seed": 0})
    assert r.status_code == 200, r.text
    assert [decode_png(item["b64_json"]).size for item in r.json()["data"]] == [(32, 32)] * 2
    body = c.post(CHAT, json={"messages": user("draw a red circle"), "seed": 1}).json()
    content = body["choices"][0]["message"]["content"]
    assert content[0]["type"] == "image_url" and body["usage"]["completion_tokens"] == 64 + 1
    events = sse_events(c.post(CHAT, json={"messages": user("draw a red circle"), "stream": True}).text)
    parts = [e["choices"][0]["delta"]["content"] for e in events
             if e["choices"] and isinstance(e["choices"][0]["delta"].get("content"), list)]
    assert len(parts) == 1 and parts[0][0]["image_url"]["url"].startswith("data:image/png;base64,")
    text = c.post(CHAT, json={"messages": user("what colour is the circle?"), "max_tokens": 5}).json()
    assert isinstance(text["choices"][0]["message"]["content"], str)


def sse_events(text: str) -> list:
    lines = [line for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), text
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_streaming(client):
    request = {"messages": user("how many shapes are there?"), "max_tokens": 12, "temperature": 0}
    whole = client.post(CHAT, json=request).json()
    r = client.post(CHAT, json={**request, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]  # greedy: same answer, streamed
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    # a picture streams as one delta holding the image part
    events = sse_events(client.post(CHAT, json={"messages": user("draw a red circle"), "stream": True}).text)
    deltas = [e["choices"][0]["delta"] for e in events]
    parts = [d["content"] for d in deltas if isinstance(d.get("content"), list)]
    assert len(parts) == 1 and parts[0][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_auth(served):
    c = make_client(served, api_key="s3cret")
    error = error_of(c.get("/v1/models"), 401, "invalid_api_key")
    assert error["type"] == "invalid_request_error"
    error_of(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    error_of(c.post(CHAT, content=b"not even json"), 401)  # refused before the body is read
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
    assert make_client(served).get("/v1/models").status_code == 200  # no key configured: open


# ---- limits --------------------------------------------------------------------------------------
LIMIT_CASES = {
    "body too large": ({"max_body_bytes": 1000}, CHAT, {"messages": user("x" * 2000)}, 413, "body_too_large"),
    "max_tokens over the limit": ({}, CHAT, {"messages": user("hi"), "max_tokens": 257}, 400, "invalid_value"),
    "max_tokens over the context": ({"max_tokens": 1000}, CHAT, {"messages": user("hi"), "max_tokens": 159}, 400,
                                    "context_length_exceeded"),
    "prompt over the context": ({}, CHAT, {"messages": user("red " * 300)}, 400, "context_length_exceeded"),
    "too many images": ({"max_images": 1}, CHAT, {"messages": user([{"type": "image_url", "image_url":
                        {"url": "x"}}] * 2)}, 400, "too_many_images"),
    "image too large": ({"max_image_bytes": 50}, CHAT, {"messages": user([{"type": "image_url", "image_url":
                        {"url": "SCENE"}}])}, 400, "image_too_large"),
    "not a data URL": ({}, CHAT, {"messages": user([{"type": "image_url", "image_url":
                       {"url": "https://example.com/a.png"}}])}, 400, "invalid_image_url"),
    "not an image data URL": ({}, CHAT, {"messages": user([{"type": "image_url", "image_url":
                              {"url": "data:text/plain;base64,aGVsbG8="}}])}, 400, "invalid_image_url"),
    "bad base64": ({}, CHAT, {"messages": user([{"type": "image_url", "image_url":
                   {"url": "data:image/png;base64,@@@"}}])}, 400, "invalid_image_url"),
    "bytes that are no image": ({}, CHAT, {"messages": user([{"type": "image_url", "image_url":
                                {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}}])}, 400, "invalid_image"),
    "unknown model (chat)": ({}, CHAT, {"model": "gpt-4o", "messages": user("hi")}, 404, "model_not_found"),
    "unknown model (images)": ({}, IMAGES, {"model": "dall-e-3", "prompt": "a red circle"}, 404, "model_not_found"),
    "n too large": ({}, IMAGES, {"prompt": "a red circle", "n": 5}, 400, "invalid_value"),
    "wrong size": ({}, IMAGES, {"prompt": "a red circle", "size": "1024x1024"}, 400, "invalid_value"),
    "url response format": ({}, IMAGES, {"prompt": "a red circle", "response_format": "url"}, 400, "invalid_value"),
    "wrong type": ({}, CHAT, {"messages": "hello"}, 400, "invalid_value"),
    "missing field": ({}, IMAGES, {"n": 1}, 400, "invalid_value"),
    "temperature out of range": ({}, CHAT, {"messages": user("hi"), "temperature": 5}, 400, "invalid_value"),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_limits(served, case):
    limits, path, body, status, code = LIMIT_CASES[case]
    body = json.loads(json.dumps(body).replace('"SCENE"', json.dumps(scene_url())))
    error = error_of(make_client(served, limits=Limits(**limits)).post(path, json=body), status, code)
    if case.startswith("max_tokens"):
        assert error["param"] == "max_tokens"


def test_malformed_json_and_unknown_routes(client):
    error_of(client.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"}), 400,
             "invalid_json")
    error_of(client.post(CHAT, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    error_of(client.get("/v1/nothing"), 404, "not_found")
    error_of(client.get(CHAT), 405)
    error_of(client.get("/v1/models/gpt-4o"), 404, "model_not_found")


def test_queue_full_is_429_and_metrics(served):
    c = make_client(served, limits=Limits(max_queue=1, max_batch=1))
    scheduler, bos = c.app.state.scheduler, served[0].vocab.bos
    scheduler.pause()  # decoding held: the first request takes the batch's only row, the second waits
    blockers = scheduler.submit_many([Request([bos], 4), Request([bos], 4)])  # one running, one queued: full
    try:
        deadline = time.monotonic() + 5
        while scheduler.running < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        metrics = c.get("/metrics").text
        assert "nmm_queue_depth 1" in metrics and "nmm_requests_running 1" in metrics
        error = error_of(c.post(CHAT, json={"messages": user("hi"), "max_tokens": 2}), 429, "queue_full")
        assert error["type"] == "rate_limit_error"
    finally:
        scheduler.resume()
        for b in blockers:
            b.result(timeout=5)
    assert c.post(CHAT, json={"messages": user("hi"), "max_tokens": 2}).status_code == 200
    metrics = c.get("/metrics").text
    assert 'nmm_requests_total{route="/v1/chat/completions",status="429"} 1' in metrics
    assert 'nmm_requests_total{route="/v1/chat/completions",status="200"} 1' in metrics
    assert 'nmm_request_latency_seconds_count{route="/v1/chat/completions"} 2' in metrics
    assert "nmm_queue_depth 0" in metrics and "# TYPE nmm_tokens_generated_total counter" in metrics
    text_tokens = re.search(r'^nmm_tokens_generated_total\{modality="text"\} (\d+)$', metrics, re.M)
    assert int(text_tokens.group(1)) >= 1


# ---- fuzz ----------------------------------------------------------------------------------------
def junk(rng: random.Random, depth: int = 0):
    """A random JSON value: wrong types, huge numbers, odd strings, nested junk."""
    leaves = [None, True, False, 0, -1, 2**31, 10**30, -(10**30), 1e308, -1e-308, 0.5, "", "a", "x" * 5000,
              "\u0000\ud7ff\U0001f600", "NaN", "data:image/png;base64,", "1" * 50]
    if depth > 3 or rng.random() < 0.5:
        return rng.choice(leaves)
    if rng.random() < 0.5:
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["type", "text", "image_url", "url", "role", "content", "messages", rng.choice("abcxyz")]
    return {rng.choice(keys): junk(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def bad_image_urls(rng: random.Random) -> list[str]:
    png = png_bytes(np.zeros((32, 32, 3), np.uint8))
    return ["data:image/png;base64,!!!!", "data:image/png;base64," + "A" * 7, data_url(png[: len(png) // 2]),
            data_url(rng.randbytes(64)), data_url(png, "text/html"), "data:image/png," + "x" * 10, "data:",
            "", "http://127.0.0.1:1/x.png", "file:///etc/passwd", data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>",
            "image/svg+xml"), "data:image/png;base64," + "=" * 12, data_url(png) + "%%"]


def fuzz_requests(n: int, seed: int = 0):
    """(method, path, body bytes, content type) for `n` malformed or odd requests."""
    rng = random.Random(seed)
    chat = {"messages": user("what colour is the circle?"), "max_tokens": 3}
    image = {"prompt": "a red circle"}
    chat_fields = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                   "n", "seed", "stream", "stream_options", "modalities", "cfg_scale", "repetition_penalty", "zzz"]
    image_fields = ["model", "prompt", "n", "size", "response_format", "temperature", "cfg_scale", "seed", "top_p"]
    urls = bad_image_urls(rng)
    for _ in range(n):
        kind = rng.randrange(10)
        path = rng.choice([CHAT, IMAGES])
        base, fields = (dict(chat), chat_fields) if path == CHAT else (dict(image), image_fields)
        ctype = "application/json"
        if kind == 0:  # random bytes
            yield "POST", path, rng.randbytes(rng.randint(0, 300)), ctype
            continue
        if kind == 1:  # a random JSON document
            body = junk(rng)
        elif kind in (2, 3):  # one field of a good request replaced by junk
            base[rng.choice(fields)] = junk(rng)
            body = base
        elif kind == 4:  # a field missing
            base.pop(rng.choice(list(base)), None)
            body = base
        elif kind == 5:  # a broken message
            message = {"role": rng.choice(["user", "assistant", "system", "tool", "robot", 7]),
                       "content": rng.choice([junk(rng), [junk(rng)], [{"type": "image_url", "image_url": junk(rng)}],
                                              [{"type": "text", "text": junk(rng)}]])}
            body, path = {"messages": [message], "max_tokens": 2}, CHAT
        elif kind == 6:  # a bad image URL
            parts = [{"type": "image_url", "image_url": {"url": rng.choice(urls)}}, {"type": "text", "text": "hi"}]
            body, path = {"messages": user(parts), "max_tokens": 2}, CHAT
        elif kind == 7:  # huge or edge-case numbers
            base[rng.choice(fields)] = rng.choice([10**400, -(10**400), 2**63, 2**64, 1e-300, 0, -0.0, 3])
            body = base
        elif kind == 8:  # text that is not JSON, JSON that Python cannot read back, odd content types
            raw = rng.choice([b"[" * 5000, b'{"a": ' * 3000, b'{"n": ' + b"9" * 5000 + b"}", b"\xff\xfe{}",
                              b'{"messages": NaN}', b'{"temperature": Infinity, "messages": []}', b"null", b"{}"])
            yield "POST", path, raw, rng.choice([ctype, "text/plain", "application/x-www-form-urlencoded", ""])
            continue
        else:  # odd methods and paths
            odd_path = rng.choice([CHAT, IMAGES, "/v1/models/%00", "/v2", "/static/../x", "/v1/models/"])
            yield rng.choice(["GET", "PUT", "DELETE", "PATCH"]), odd_path, b"{}", ctype
            continue
        yield "POST", path, json.dumps(body).encode(), ctype


def test_fuzz_never_5xx(served):
    c = make_client(served, limits=Limits(default_max_tokens=4))
    failures = []
    for method, path, body, ctype in fuzz_requests(300):
        headers = {"content-type": ctype} if ctype else {}
        r = c.request(method, path, content=body, headers=headers)
        ok = r.status_code < 500 and (r.status_code < 400 or set(r.json().get("error", {})) >= {"message", "code"})
        if not ok:
            failures.append((method, path, body[:120], r.status_code, r.text[:200]))
    assert not failures, failures[:5]


# ---- the official client against a live server --------------------------------------------------
@pytest.fixture(scope="module")
def live_url(served, live):
    with live(create_app(*served, api_key="sk-test")) as url:
        yield f"{url}/v1"


def test_openai_client(live_url, served):
    import openai
    client = openai.OpenAI(base_url=live_url, api_key="sk-test", max_retries=0, timeout=30)
    name = served[1]
    assert [m.id for m in client.models.list()] == [name]

    reply = client.chat.completions.create(model=name, messages=user("what colour is the circle?"), max_tokens=5,
                                           temperature=0)
    assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens >= 1

    stream = client.chat.completions.create(model=name, messages=user("what colour is the circle?"), max_tokens=5,
                                            temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == reply.choices[0].message.content

    images = client.images.generate(model=name, prompt="a small red circle at the top left", n=1, size="32x32",
                                    response_format="b64_json")
    assert decode_png(images.data[0].b64_json).size == (32, 32)

    drawn = client.chat.completions.create(model=name, messages=user("draw a red circle"))
    part = drawn.choices[0].message.content[0]  # a list of content parts, passed through by the client
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
