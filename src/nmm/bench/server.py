"""`nmm bench server`: requests/s, tokens/s and latency of `nmm serve` under 1, 8 and 32 concurrent clients.

The benchmark starts `nmm serve TARGET` as a subprocess on 127.0.0.1 (a free port), waits for
/health, and drives it over HTTP only, so it measures whatever the server does. Each client is a
thread with its own keep-alive connection (standard library `http.client`, so the load generator
adds no dependency) that sends the same request again and again:

    POST /v1/chat/completions {"messages": [{"role": "user", "content": PROMPT}],
                               "max_tokens": 32, "temperature": 0,
                               "min_tokens": 32, "ignore_eos": true}

**Fixed-length answers.** Every answer is exactly `max_tokens` tokens long, so a level measures
batched decoding and not only request overhead (left to itself, an answer of a random-weights preset
stops at `<eos>` after about 4 tokens). This is what vLLM's serving benchmark does with its
`ignore_eos` / `min_tokens` request fields, which the body above sends and `nmm serve` honours.The benchmark checks every answer: `completion_tokens == max_tokens`, `finish_reason == "length"`
(`wrong_length` counts any that are not, and the warm-up stops the benchmark if the server does not
comply).

A level sends a fixed number of requests in total, shared by its clients. Latency is from sending
a request to reading the whole answer. A `429` (queue full) is retried by the same client after a
short pause, as a real client would, and its wait counts in that request's latency; the JSON
reports how many there were. requests/s = answered requests / wall time of the level, tokens/s =
completion tokens / wall time. With `stream=True` the requests are streamed (server-sent events,
`stream_options.include_usage`) and each level also reports time to first token (TTFT: to the first
non-empty content delta) and time per output token after the first (TPOT); streaming makes the
server wake its event loop for every token, so its requests/s are not those of plain requests. The
server runs with one torch thread (`--threads`, as decode and image; `OMP_NUM_THREADS` of its process).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from nmm.bench.common import env_info, goal
from nmm.errors import NmmError

GOAL_SCALING_32 = 10.0
PROMPT = "a small red circle at the top left and a large blue square at the center"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`nmm serve TARGET` in a subprocess, stopped (terminate, then kill) on exit."""

    def __init__(self, target: str, port: int | None = None, startup_timeout: float = 180.0, env: dict | None = None):
        self.target, self.port = target, port or free_port()
        self.startup_timeout, self.env = startup_timeout, env
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def __enter__(self):
        import tempfile

        import nmm

        env = {**os.environ, **(self.env or {})}
        # The child imports the same nmm as this process, installed or not.
        src = str(Path(nmm.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        log = tempfile.NamedTemporaryFile("w+b", prefix="nmm-bench-serve-", suffix=".log", delete=False)
        self.log_path = Path(log.name)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nmm.cli", "serve", self.target,
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NmmError(f"nmm serve {self.target} exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _ = request(self.port, "GET", "/health", timeout=2.0)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise NmmError(f"nmm serve {self.target} did not answer /health within {self.startup_timeout:.0f} s:\n"
                       f"{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)


def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 300.0,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, dict]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, (json.loads(payload) if payload[:1] in (b"{", b"[") else {})
    finally:
        if own:
            conn.close()


def chat(conn: http.client.HTTPConnection, body: dict) -> tuple[int, dict, float | None]:
    """One chat completion on `conn`: (status, reply, seconds to the first content). A streamed reply is
    read event by event and returned in the shape of a plain one (usage, choices[0].finish_reason);
    the time to first token is None for a plain request."""
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if not body.get("stream") or resp.status != 200:
        payload = resp.read()
        return resp.status, (json.loads(payload) if payload[:1] in (b"{", b"[") else {}), None
    first, finish, usage, error = None, None, None, None
    while line := resp.readline():
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            error = chunk
        for choice in chunk.get("choices", []):
            if first is None and choice["delta"].get("content"):
                first = time.perf_counter() - t0
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
    resp.read()  # the end of the chunked body, so that the connection can be reused
    if error is not None or usage is None:
        return 500, error or {"error": "the stream ended without usage"}, None
    return 200, {"usage": usage, "choices": [{"finish_reason": finish}]}, first


def chat_body(max_tokens: int, stream: bool = False) -> dict:
    """The benchmark's request: greedy, and exactly `max_tokens` tokens long (vLLM's `min_tokens` and
    `ignore_eos` fields; see the module docstring for servers without them)."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0,
            "min_tokens": max_tokens, "ignore_eos": True}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def _pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)), 4) if xs else float("nan")


def run_level(port: int, clients: int, n_requests: int, body: dict, timeout: float = 300.0) -> dict:
    """`clients` threads send `n_requests` requests in total (each takes the next one while any are left)."""
    lock = threading.Lock()
    left = [n_requests]
    latencies: list[float] = []
    ttfts: list[float] = []
    tpots: list[float] = []
    tokens: list[int] = []
    finish: dict[str, int] = {}
    errors: list[str] = []
    retries = [0]

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                start, pause = time.perf_counter(), 0.05
                while True:
                    attempt = time.perf_counter()
                    try:
                        status, reply, first = chat(conn, body)
                    except (OSError, http.client.HTTPException, ValueError) as e:  # dropped: count it, reconnect
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                        status, reply, first = -1, {"error": repr(e)}, None
                    if status != 429:
                        break
                    with lock:
                        retries[0] += 1
                    time.sleep(pause)  # the queue is full: back off, then try again
                    pause = min(pause * 2, 1.0)
                elapsed = time.perf_counter() - start
                with lock:
                    if status == 200:
                        n = reply["usage"]["completion_tokens"]
                        latencies.append(elapsed)
                        tokens.append(n)
                        if first is not None:
                            ttfts.append(attempt - start + first)
                            if n > 1:
                                tpots.append((elapsed - (attempt - start + first)) / (n - 1))
                        reason = reply["choices"][0]["finish_reason"]
                        finish[reason] = finish.get(reason, 0) + 1
                    else:
                        errors.append(f"{status}: {str(reply)[:200]}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    forced = body.get("min_tokens")
    level = {
        "clients": clients, "requests": n_requests, "ok": len(latencies), "errors": len(errors),
        "retried_429": retries[0], "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 3),
        "completion_tokens_per_s": round(sum(tokens) / wall, 1),
        "latency_p50_s": _pct(latencies, 50), "latency_p99_s": _pct(latencies, 99),
        "latency_mean_s": round(float(np.mean(latencies)), 4) if latencies else float("nan"),
        "completion_tokens_mean": round(float(np.mean(tokens)), 2) if tokens else 0.0,
        "completion_tokens_min": min(tokens, default=0), "completion_tokens_max": max(tokens, default=0),
        "wrong_length": sum(n != forced for n in tokens) if forced else None,
        "finish_reasons": finish,
        "first_errors": errors[:3],
    }
    if body.get("stream"):
        level |= {"ttft_p50_s": _pct(ttfts, 50), "ttft_p99_s": _pct(ttfts, 99),
                  "tpot_p50_s": _pct(tpots, 50), "tpot_p99_s": _pct(tpots, 99)}
    return level


def run_server(target: str, clients=(1, 8, 32), requests_per_level: int = 64, max_tokens: int = 32,
               warmup_requests: int = 2, threads: int | None = 1, stream: bool = False, log=lambda *a: None) -> dict:
    """`threads`: torch threads of the server process (OMP_NUM_THREADS / MKL_NUM_THREADS), one by default like
    the other benchmarks; None leaves torch's default (all cores, which on a small shared CPU also competes with
    the load generator and the event loop). `stream`: streamed requests, with time to first token."""
    body = chat_body(max_tokens, stream)
    levels = []
    env = None if threads is None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with ServerProcess(target, env=env) as server:
        log(f"nmm serve {target} on 127.0.0.1:{server.port}; fixed-length answers (min_tokens / ignore_eos)")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        try:
            for _ in range(max(warmup_requests, 1)):  # one-off costs (allocations, lazy imports); checks the length
                status, reply, _ = chat(conn, body)
                if status != 200:
                    raise NmmError(f"server bench: warm-up request failed with {status}: {reply}")
                n = reply["usage"]["completion_tokens"]
                if n != max_tokens or reply["choices"][0]["finish_reason"] != "length":
                    raise NmmError(f"server bench: asked for exactly {max_tokens} tokens, the server answered {n} "
                                   f"(finish_reason {reply['choices'][0]['finish_reason']!r}); it does not honour "
                                   f"the fixed-length request (min_tokens / ignore_eos)")
        finally:
            conn.close()
        for c in clients:
            level = run_level(server.port, c, requests_per_level, body)
            if level["ok"] == 0:
                raise NmmError(f"server bench: no request succeeded at {c} clients: {level['first_errors']}")
            levels.append(level)
            ttft = f", TTFT p50 {level['ttft_p50_s']:.3f} s" if stream else ""
            log(f"{c} clients: {level['requests_per_s']:.2f} req/s, {level['completion_tokens_per_s']:.0f} tokens/s, "
                f"p50 {level['latency_p50_s']:.3f} s, p99 {level['latency_p99_s']:.3f} s{ttft}, "
                f"{level['errors']} errors, {level['retried_429']} retried 429s, {level['wrong_length']} wrong length")
    base = levels[0]["requests_per_s"]
    top = levels[-1]
    scaling = round(top["requests_per_s"] / base, 3) if base > 0 else 0.0
    return {
        "benchmark": "server",
        "what": (f"nmm serve {target}: chat completions of exactly {max_tokens} tokens (temperature 0"
                 f"{', streamed' if stream else ''}), {requests_per_level} requests per level; "
                 "requests/s and tokens/s = answered requests and their completion tokens / wall time"),
        "config": {"target": target, "clients": list(clients), "requests_per_level": requests_per_level,
                   "max_tokens": max_tokens, "fixed_length_via": "request fields min_tokens / ignore_eos", "stream": stream,
                   "prompt": PROMPT,
                   "warmup_requests": max(warmup_requests, 1), "server_threads": threads},
        "levels": levels,
        "scaling": scaling,
        "tokens_per_s_scaling": round(top["completion_tokens_per_s"] / levels[0]["completion_tokens_per_s"], 3)
        if levels[0]["completion_tokens_per_s"] > 0 else 0.0,
        "goal": goal(f"requests/s at {top['clients']} clients / at {levels[0]['clients']}", scaling, GOAL_SCALING_32),
        "env": env_info(),  # of this process: the load generator shares the machine with the server
    }
