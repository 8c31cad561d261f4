"""The inference examples (``aifactory_examples.serve``, ``.embed``) served on loopback: real
models answering concurrent requests, and the requests in flight counted and reported.

They need no external component but open sockets, which unit tests never do. The command
form runs as the Ray worker runs it (``python -m ...`` with ``HOST``/``PORT``
set) and is read back through its ``AIFACTORY_REPORT`` lines; the counting itself is checked
with a handler held at a gate, so "N in flight" is a fact, not a race.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from aifactory_examples import embed
from aifactory_examples.context import REPORT_PREFIX
from aifactory_examples.serving import InferenceServer

pytestmark = pytest.mark.integration

CONCURRENT = 12


def post(url: str, payload: Any, timeout: float = 30.0) -> tuple[int, Any]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def wait_until(done: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if done():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# --------------------------------------------------------------------------- counting


def test_requests_held_in_the_handler_are_counted_in_flight_and_reported() -> None:
    gate = threading.Event()
    reports: list[dict[str, int]] = []

    def held(body: bytes) -> bytes:
        assert gate.wait(20)
        return body.upper()

    server = InferenceServer(held, report=lambda **counts: reports.append(counts)).start()
    try:
        with ThreadPoolExecutor(CONCURRENT) as pool:
            answers = [pool.submit(post, server.url, {"n": i}) for i in range(CONCURRENT)]
            wait_until(lambda: server.load.snapshot()["in_flight"] == CONCURRENT,
                       f"{CONCURRENT} requests in flight")
            assert get(server.url + "/stats") == {"in_flight": CONCURRENT,
                                                   "requests_total": CONCURRENT}
            wait_until(lambda: reports[-1]["in_flight"] == CONCURRENT, "a report of them")
            gate.set()
            results = [a.result(timeout=30) for a in answers]
        assert sorted(r[1]["N"] for r in results) == list(range(CONCURRENT))
        wait_until(lambda: reports[-1] == {"in_flight": 0, "requests_total": CONCURRENT},
                   "the report of none in flight")
    finally:
        gate.set()
        server.shutdown()
    assert reports[0] == {"in_flight": 0, "requests_total": 0}  # an idle replica says so
    assert len(reports) < 4 * CONCURRENT  # coalesced, not one line per change


def test_a_failing_handler_answers_500_and_bad_input_400_and_both_leave_the_count() -> None:
    def handle(body: bytes) -> bytes:
        if body == b"bad":
            raise ValueError("prompt: expected a string")
        raise RuntimeError("model crashed")

    server = InferenceServer(handle, report=None).start()
    try:
        assert post(server.url, b"bad") == (400, {"error": "prompt: expected a string"})
        assert post(server.url, b"x") == (500, {"error": "RuntimeError: model crashed"})
        assert server.load.snapshot() == {"in_flight": 0, "requests_total": 2}
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- as commands


def _serve_check(url: str, i: int) -> None:
    request = {"prompt": f"Training {i % 3}", "max_tokens": 50 + i, "seed": i % 3}
    code, answer = post(url, request)
    assert code == 200, answer
    assert answer["model"] == "char-trigram" and answer["tokens"] == 50 + i
    again = post(url, request)[1]
    assert again["text"] == answer["text"]  # same request, same text


def _embed_check(url: str, i: int) -> None:
    code, answer = post(url, {"input": [f"request {i}", "the same text"]})
    assert code == 200, answer
    first, second = (d["embedding"] for d in answer["data"])
    assert len(first) == embed.DIMENSIONS
    assert sum(v * v for v in second) == pytest.approx(1.0, abs=1e-3)


@pytest.fixture
def command() -> Iterator[Callable[[str], tuple[str, queue.Queue[str]]]]:
    """Start ``python -m MODULE`` as a worker would; its URL and a queue of its lines."""
    started: list[tuple[subprocess.Popen[str], threading.Thread]] = []

    def start(module: str) -> tuple[str, queue.Queue[str]]:
        env = dict(os.environ, HOST="127.0.0.1", PORT="0", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines: queue.Queue[str] = queue.Queue()
        out = proc.stdout
        assert out is not None
        reader = threading.Thread(target=lambda: [lines.put(x) for x in out], daemon=True)
        reader.start()
        started.append((proc, reader))
        first = lines.get(timeout=60)
        assert first.startswith("serving "), first
        return first.split(" at ")[-1].strip(), lines

    yield start
    for proc, reader in started:
        proc.terminate()
        assert proc.wait(20) == 0  # SIGTERM is a clean stop
        reader.join(10)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("module", "check"), [
    ("aifactory_examples.serve", _serve_check),
    ("aifactory_examples.embed", _embed_check),
], ids=["the language model", "the embedder"])
def test_a_command_replica_answers_concurrent_requests_and_reports_its_load(
        command: Callable[[str], tuple[str, queue.Queue[str]]], module: str,
        check: Callable[[str, int], None]) -> None:
    url, lines = command(module)
    assert post(url, b"{not json")[0] == 400
    with ThreadPoolExecutor(CONCURRENT) as pool:
        for done in [pool.submit(check, url, i) for i in range(CONCURRENT)]:
            done.result(timeout=60)
    total = 1 + CONCURRENT * (2 if module.endswith("serve") else 1)
    assert get(url + "/stats") == {"in_flight": 0, "requests_total": total}
    reports: list[dict[str, int]] = []
    while not reports or reports[-1] != {"in_flight": 0, "requests_total": total}:
        line = lines.get(timeout=20)
        if line.startswith(REPORT_PREFIX):
            reports.append(json.loads(line[len(REPORT_PREFIX):]))
    assert all(r["in_flight"] >= 0 for r in reports)
    assert [r["requests_total"] for r in reports] == sorted(r["requests_total"] for r in reports)
