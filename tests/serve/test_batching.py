"""The server on the continuous-batching scheduler: streaming sends each token as it is decoded,
concurrent requests share decode steps, a client that leaves frees its row, bf16 weights serve.

The model's decode step is wrapped by a gate the test opens one step at a time, so these tests say
exactly what the client holds after each step instead of relying on timing.
"""

from __future__ import annotations

import json
import queue
import threading
import time


import httpx
from fastapi.testclient import TestClient

from nmm.api import Pipeline
from nmm.serve import Limits, create_app, load_pipeline

CHAT = "/v1/chat/completions"


class Gate:
    """Wraps an engine's decode step: each step waits until the test lets it run."""

    def __init__(self, engine):
        self.inner, self.allowed, self.ran = engine.decode_step, threading.Semaphore(0), 0
        self.open = False
        engine.decode_step = self

    def __call__(self, *args):
        if not self.open:
            assert self.allowed.acquire(timeout=30), "the test never let this step run"
        self.ran += 1
        return self.inner(*args)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.allowed.release()

    def release_all(self) -> None:
        self.open = True
        self.step(1000)


def gated_app(served, **limits):
    pipe = Pipeline(served[0].model, served[0].codecs)  # its own Engine, so the gate stays in this test
    return create_app(pipe, served[1], limits=Limits(**limits)), Gate(pipe.engine)


def read_events(response, into: queue.Queue) -> None:
    for line in response.iter_lines():
        if line.startswith("data: "):
            into.put(line[6:])
    into.put(None)


def test_stream_sends_each_token_as_it_is_decoded(served, live):
    request = {"messages": [{"role": "user", "content": "what colour is the circle?"}], "max_tokens": 40,
               "temperature": 0}
    whole = TestClient(create_app(*served)).post(CHAT, json=request).json()  # the reference answer
    assert whole["usage"]["completion_tokens"] >= 20, "the test needs a long answer from this model"
    app, gate = gated_app(served)
    events: queue.Queue = queue.Queue()
    with live(app) as url, httpx.Client(timeout=30) as client:
        with client.stream("POST", url + CHAT, json={**request, "stream": True}) as response:
            assert response.status_code == 200
            threading.Thread(target=read_events, args=(response, events), daemon=True).start()
            first = json.loads(events.get(timeout=30))
            assert first["choices"][0]["delta"]["role"] == "assistant"  # sent before any token exists
            # Each token is sampled before its decode step runs, so with the gate shut the client can
            # already hold the first text, while the rest of the answer does not exist yet.
            text, steps = "", 0
            while not text:
                try:
                    text += json.loads(events.get(timeout=2))["choices"][0]["delta"].get("content", "")
                except queue.Empty:  # that token decoded to nothing visible: let one more step run
                    gate.step()
                    steps += 1
                    assert steps < 10
            # the client holds text while the request is still being generated, far from its end
            assert gate.ran <= steps < 10 and app.state.scheduler.running == 1
            assert len(text) < len(whole["choices"][0]["message"]["content"]) / 2
            gate.release_all()
            rest = []
            while (data := events.get(timeout=30)) is not None:
                rest.append(data)
    assert rest[-1] == "[DONE]"
    chunks = [json.loads(d) for d in rest[:-1]]
    text += "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_concurrent_requests_share_decode_steps(served, live):
    app = create_app(Pipeline(served[0].model, served[0].codecs), served[1])
    scheduler = app.state.scheduler
    bodies = [{"messages": [{"role": "user", "content": f"how many shapes are there? {i}"}], "max_tokens": 16,
               "temperature": 0} for i in range(8)]
    bodies.append({"messages": [{"role": "user", "content": "draw a red circle"}], "seed": 1})
    results: dict[int, httpx.Response] = {}
    with live(app) as url, httpx.Client(timeout=60) as client:
        alone = client.post(url + CHAT, json=bodies[0]).json()  # nothing else running
        steps_before = scheduler.steps
        scheduler.pause()  # hold decoding until every request has joined (they are admitted meanwhile)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, client.post(url + CHAT, json=bodies[i])))
                   for i in range(len(bodies))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while scheduler.running < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.running == len(bodies) and scheduler.rows_in_use == len(bodies) + 1  # CFG: +1 row
        metrics = TestClient(app).get("/metrics").text
        assert f"nmm_requests_running {len(bodies)}" in metrics and "nmm_batch_rows 10" in metrics
        scheduler.resume()
        for t in threads:
            t.join(timeout=60)
    assert sorted(results) == list(range(len(bodies))) and all(r.status_code == 200 for r in results.values())
    answers = [results[i].json() for i in range(len(bodies))]
    assert answers[0]["choices"] == alone["choices"]  # in a batch of nine or alone: the same greedy answer
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    steps = scheduler.steps - steps_before
    assert steps == 65  # the picture's 64 codes and <eoi>; every text answer rode along in the same steps
    assert tokens >= 8 + 65 and steps < tokens / 1.5
    assert answers[-1]["choices"][0]["message"]["content"][0]["type"] == "image_url"


def test_a_client_that_leaves_frees_its_row(served, live):
    app, gate = gated_app(served, max_batch=2)
    scheduler, handles = app.state.scheduler, []
    submit = scheduler.submit_many
    scheduler.submit_many = lambda *a: handles.extend(submit(*a)) or handles  # to look at the request later
    body = {"messages": [{"role": "user", "content": "what colour is the circle?"}], "max_tokens": 100,
            "stream": True}
    with live(app) as url, httpx.Client(timeout=30) as client:
        with client.stream("POST", url + CHAT, json=body) as response:
            next(response.iter_lines())
            assert scheduler.running == 1
        deadline = time.monotonic() + 20  # the stream is closed: the server notices at its next write
        while scheduler.running and time.monotonic() < deadline:
            gate.step()
            time.sleep(0.05)
        gate.release_all()
    assert scheduler.running == 0 and scheduler.rows_in_use == 0
    (handle,) = handles
    assert handle.cancelled and not handle.finished and len(handle.tokens) < 60


def test_bf16_server(served):
    pipe, name = load_pipeline("shapes-tiny", dtype="bf16")
    assert next(pipe.model.parameters()).dtype.is_floating_point and str(pipe.engine.dtype) == "torch.bfloat16"
    client = TestClient(create_app(pipe, name))
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "what colour?"}], "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2})
    assert r.status_code == 200 and len(r.json()["data"]) == 2


def test_a_failing_step_fails_its_requests_not_the_server(served):
    pipe = Pipeline(served[0].model, served[0].codecs)
    inner, failures = pipe.engine.decode_step, []

    def step(*args):
        if failures:
            failures.pop()
            raise RuntimeError("simulated failure inside the model")
        return inner(*args)

    pipe.engine.decode_step = step
    client = TestClient(create_app(pipe, served[1]), raise_server_exceptions=False)
    body = {"messages": [{"role": "user", "content": "what colour is the circle?"}], "max_tokens": 8}
    failures.append(1)
    r = client.post(CHAT, json={**body, "stream": True})
    assert r.status_code == 200  # the failure came after the stream began: it is reported in-band
    data = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["type"] == "server_error"
    failures.append(1)
    r = client.post(CHAT, json=body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert client.post(CHAT, json=body).status_code == 200  # the scheduler goes on serving
    assert app_idle(client)


def app_idle(client) -> bool:
    scheduler = client.app.state.scheduler
    return scheduler.running == 0 and scheduler.rows_in_use == 0 and scheduler.waiting == 0
