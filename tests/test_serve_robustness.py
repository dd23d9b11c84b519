"""One request never hurts another, live on loopback: a request that fails while sampling or detokenising
ends alone while concurrent ones complete; work per request and the waiting queue are bounded; a body that
never arrives times out; requests uvicorn cannot parse get OpenAI-shaped errors; and at shutdown, streams
still running after the grace period end with an error event and [DONE]."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, fields

import pytest

import deepmoe.engine.llm as llm_module
from deepmoe.cli import build_parser
from deepmoe.engine.llm import LLMEngine

from .conftest import failing_sample
from .serving import (CONTEXT, GREEDY, KEY, LIMITS, NAME, ServerLimits, assert_openai_error, assert_still_serving,
                      completion, expected, http_client, live_server, metrics, openai, sse_data, start_server, wait_for)

from deepmoe.serve.app import build_app  # noqa: E402  (imported after .serving, which skips without fastapi)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    yield from live_server(tmp_path_factory)


# ---- failures stay with their request ------------------------------------------------------------
def test_a_failing_request_ends_alone_while_concurrent_ones_complete(srv, monkeypatch):
    """Six long requests run; then three fail: sampling for seed 666 raises (non-streamed: a 500; streamed: an
    error event and [DONE]), and detokenising seed 667's stream raises after its first tokens (the openai
    client raises on the error event). The six complete with exactly the text they get alone."""
    client, engine = srv["client"], srv["engine"]
    good = [dict(prompt=[5 + i, 6 + i, 7 + i], **GREEDY) for i in range(3)]
    good += [dict(prompt=f"def f{i}(x):", temperature=1.0, seed=i, extra_body={"ignore_eos": True}) for i in range(3)]

    def run(job, stream):
        r = client.completions.create(model=NAME, max_tokens=96, stream=stream, **job)
        return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

    solo = [run(job, False) for job in good]
    running_at_failure = []
    sample = failing_sample(llm_module.sample, seed=666)

    def spied_sample(logits, params, *rest):
        if any(p.seed == 666 for p in params):
            running_at_failure.append(len(engine.scheduler.running))
        return sample(logits, params, *rest)

    real_text = engine.text

    def text(seq):
        if seq.params.seed == 667 and seq.num_completion_tokens >= 2:
            raise RuntimeError("injected detokenizer failure")
        return real_text(seq)

    monkeypatch.setattr(llm_module, "sample", spied_sample)
    monkeypatch.setattr(engine, "text", text)
    before = metrics(srv)
    with ThreadPoolExecutor(len(good)) as pool, http_client(srv["port"]) as http:
        together = [pool.submit(run, job, True) for job in good]
        wait_for(lambda: len(engine.scheduler.running) == len(good), "the six requests to run")
        with pytest.raises(openai.InternalServerError, match="injected sampling failure"):
            client.completions.create(model=NAME, prompt="def f9(x):", max_tokens=8, temperature=0.9, seed=666)
        bad = completion(prompt="def f9(x):", max_tokens=8, temperature=0.9, seed=666, stream=True)
        with http.stream("POST", "/v1/completions", content=json.dumps(bad)) as r:
            assert r.status_code == 200
            events = sse_data(r.iter_lines())
        assert events[-1] == "[DONE]"
        assert "injected sampling failure" in assert_openai_error(json.loads(events[-2]), 500)["message"]
        stream = client.completions.create(model=NAME, prompt="def f8(x):", max_tokens=8, temperature=0.9, seed=667,
                                           stream=True, extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError, match="injected detokenizer failure"):
            for _ in stream:
                pass
        together = [f.result() for f in together]
    assert together == solo
    assert running_at_failure and min(running_at_failure) >= len(good)  # the failures happened among the six
    errors = ("deepmoe_requests_total", (("finish_reason", "error"),))
    assert metrics(srv)[errors] == before.get(errors, 0) + 3
    assert_still_serving(srv)


# ---- bounded work per request --------------------------------------------------------------------
def test_prompts_and_sequences_per_request_are_capped(srv):
    client, cap = srv["client"], LIMITS.max_prompts_per_request
    with pytest.raises(openai.BadRequestError, match=f"at most {cap}") as e:
        client.completions.create(model=NAME, prompt=["x"] * (cap + 1), max_tokens=1)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError, match=f"at most {LIMITS.max_seqs_per_request}") as e:
        client.completions.create(model=NAME, prompt=["x"] * 4, n=5, max_tokens=1)  # 20 sequences
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], n=17, max_tokens=1)
    assert e.value.body["param"] == "n"
    out = client.completions.create(model=NAME, prompt=[[5, 6]] * cap, n=2, max_tokens=1, **GREEDY)  # at the caps
    assert len(out.choices) == 2 * cap


def test_a_full_waiting_queue_is_a_503_with_retry_after(srv):
    """One sequence runs at a time and two may wait: with three streams open, a fourth request (and one of n = 2
    when a slot frees) is refused before it costs anything; once the streams close, requests go through."""
    engine = LLMEngine(srv["model"], srv["tok"], kv_cache_bytes=1 << 20, block_size=4, max_num_seqs=1)
    limits = ServerLimits(max_seqs_per_request=2, max_waiting_seqs=2)
    server, thread, port = start_server(build_app(engine, NAME, limits=limits))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    long = completion(prompt=[5, 6, 7], max_tokens=CONTEXT - 8, stream=True, ignore_eos=True, temperature=0)
    try:
        with http_client(port) as http, ExitStack() as streams:
            for i in range(3):
                r = streams.enter_context(http.stream("POST", "/v1/completions", content=json.dumps(long)))
                assert r.status_code == 200
                wait_for(lambda: len(engine.scheduler.running) == 1 and len(engine.scheduler.waiting) == i,
                         f"request {i + 1} to be queued")
            r = http.post("/v1/completions", content=json.dumps(completion()))
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "over the queue's limit of 2" in assert_openai_error(r.json(), 503)["message"]
            with pytest.raises(openai.InternalServerError) as e:
                client.completions.create(model=NAME, prompt="x", max_tokens=1)
            assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
            streams.close()  # the clients leave: their requests are aborted and the queue empties
            wait_for(lambda: not engine.scheduler.has_unfinished(), "the queue to empty")
        out = client.completions.create(model=NAME, prompt="x", n=2, max_tokens=1)
        assert len(out.choices) == 2
    finally:
        server.should_exit = True
        thread.join(30)


def test_limits_are_validated_and_the_serve_flags_default_to_them(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # the parser checks that MODEL_DIR is a model directory
    args = build_parser().parse_args(["serve", str(tmp_path)])
    assert {f.name: getattr(args, f.name) for f in fields(ServerLimits)} == asdict(ServerLimits())
    with pytest.raises(ValueError, match="max_waiting_seqs"):
        ServerLimits(max_seqs_per_request=10, max_waiting_seqs=5)
    with pytest.raises(ValueError, match="read_timeout_s must be > 0"):
        ServerLimits(read_timeout_s=0)


# ---- what arrives on the wire --------------------------------------------------------------------
def send_raw(port, data: bytes, timeout=30.0) -> tuple[bytes, float]:
    """Send bytes on a fresh connection; (everything the server sent until it closed, seconds it took)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        start = time.monotonic()
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):  # b"": the server closed the connection
            received += chunk
    return received, time.monotonic() - start


def split_response(received: bytes) -> tuple[int, dict, bytes]:
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_a_body_shorter_than_its_content_length_times_out(srv):
    body = json.dumps(completion()).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) + 100}\r\n\r\n").encode()
    received, seconds = send_raw(srv["port"], head + body)  # 100 bytes short, and the connection left open
    status, headers, payload = split_response(received)
    assert status == 408 and headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert "did not arrive within 2 s" in assert_openai_error(json.loads(payload), 408)["message"]
    assert LIMITS.read_timeout_s <= seconds < LIMITS.read_timeout_s + 10
    assert_still_serving(srv)


@pytest.mark.parametrize("length", [b"ten", b"-1", b"5, 6", b"1e3"])
def test_a_malformed_content_length_gets_an_openai_shaped_400(srv, length):
    """uvicorn's h11 layer refuses these before the app runs; the server's protocol answers in OpenAI's shape."""
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + length + b"\r\n\r\n{}")
    status, headers, payload = split_response(send_raw(srv["port"], request)[0])
    assert status == 400 and headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert "could not be parsed" in assert_openai_error(json.loads(payload), 400)["message"]
    assert_still_serving(srv)


# ---- shutdown ------------------------------------------------------------------------------------
def test_shutdown_ends_requests_still_running_at_the_grace_period(srv):
    """A short request in flight at shutdown finishes normally within the grace period. A long stream still
    running after it gets an error event and [DONE], a long non-streamed request a 503; the server then
    exits well before uvicorn's own timeout would have cancelled them silently."""
    engine = LLMEngine(srv["model"], srv["tok"], kv_cache_bytes=1 << 20, block_size=4)
    real_step, pace = engine.step, threading.Event()

    def slow_step():  # a model slow enough that 500 tokens outlast the grace period on any machine
        pace.wait(0.005)
        return real_step()

    engine.step = slow_step
    grace = 1.0
    server, thread, port = start_server(build_app(engine, NAME, limits=ServerLimits(shutdown_grace_s=grace)))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    long = dict(model=NAME, prompt=[5, 6, 7], max_tokens=CONTEXT - 8, temperature=0, extra_body={"ignore_eos": True})

    def stream_events():
        with http_client(port) as http, http.stream("POST", "/v1/completions",
                                                    content=json.dumps(completion(**{**long, **long["extra_body"]},
                                                                                  stream=True))) as r:
            return sse_data(r.iter_lines())

    def non_streamed():
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(**long)
        return e.value

    with ThreadPoolExecutor(3) as pool:
        short = pool.submit(client.completions.create, model=NAME, prompt=[8, 9], max_tokens=8, **GREEDY)
        streamed, refused = pool.submit(stream_events), pool.submit(non_streamed)
        wait_for(lambda: len(engine.scheduler.running) == 3, "the three requests to run")
        start = time.monotonic()
        server.should_exit = True  # what SIGINT/SIGTERM do
        short, events, refused = short.result(), streamed.result(), refused.result()
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - start < grace + 4  # not uvicorn's grace + 5 s cancel
    assert short.choices[0].text == expected(srv, [8, 9], 8) and short.choices[0].finish_reason == "length"
    assert events[-1] == "[DONE]" and len(events) > 3  # some text went out before the cut
    message = assert_openai_error(json.loads(events[-2]), 503)["message"]
    assert "shut down before this request finished" in message and "grace period is 1 s" in message
    assert all("error" not in json.loads(e) for e in events[:-2])
    assert refused.status_code == 503 and "grace period" in refused.message
