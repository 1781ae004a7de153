"""Fixtures shared by the server tests: random-weight pipelines (shapes, speech) and a live uvicorn server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import uvicorn

from nmm.serve import load_pipeline


@pytest.fixture(scope="module")
def served():
    """(pipeline, model name) of the shapes-tiny preset with random weights."""
    return load_pipeline("shapes-tiny")


@pytest.fixture(scope="module")
def served_speech():
    """(pipeline, model name) of the speech-tiny preset with random weights (text <-> speech, no images)."""
    return load_pipeline("speech-tiny")


@contextlib.contextmanager
def _live(app):
    """uvicorn serving `app` on a free port of 127.0.0.1, in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive()


@pytest.fixture(scope="session")
def live():
    """`with live(app) as url:` runs `app` on a free local port for the block."""
    return _live
