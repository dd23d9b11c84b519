"""`deepmoe serve` live on loopback: a real uvicorn server over a tiny random model saved to a directory and
loaded back, driven by the official openai client (and raw HTTP where the client cannot misbehave enough).
Greedy output equals a naive full-recompute loop; streams concatenate to the non-streamed text; stop text
is never streamed; errors are OpenAI-shaped with the right status and leave the server serving; a client
that disconnects mid-stream gets its request aborted and its KV blocks freed."""

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import deepmoe.engine.llm as llm_module
from deepmoe.checkpoint import save_pretrained
from deepmoe.engine.detokenizer import decode_stable
from deepmoe.engine.llm import LLM, LLMEngine
from deepmoe.model import build_model
from deepmoe.tokenizer import train_bpe

from .conftest import naive_greedy, v3_config

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
prom_parser = pytest.importorskip("prometheus_client.parser")

from deepmoe.serve.app import build_app  # noqa: E402  (needs fastapi, skipped above without it)
from deepmoe.serve.async_engine import streamable  # noqa: E402

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 5}\n" for i in range(60)]
KEY, NAME = "sk-test", "tiny-serve"
CONTEXT = 512


def start_server(app):
    """uvicorn in a background thread on a socket bound here (port 0: no race for a free port)."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the server to start")
    return server, thread, sock.getsockname()[1]


def wait_for(condition, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def oracle_drafts(model, propose):
    """The engine's draft proposer, except that greedy requests draft the target model's own next token: the
    random MTP layer's drafts are almost never kept, these always are, so steps add two tokens each."""
    def oracle(logits, p, history, prompt_len, generator):
        token = propose(logits, p, history, prompt_len, generator)
        if p.greedy:
            with torch.no_grad():
                token = int(model(torch.tensor([history]))[0, -1].argmax())
        return token
    return oracle


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    cfg = v3_config(num_nextn_predict_layers=1, rope_scaling=None, max_position_embeddings=CONTEXT)
    model = build_model(cfg, seed=1)
    with torch.no_grad():  # a stronger head spreads the logits: no near-ties for argmax
        model.lm_head.weight.mul_(20)
    model.eval()
    tok = train_bpe(TEXTS, 300)
    model_dir = tmp_path_factory.mktemp("served")
    save_pretrained(model, model_dir)
    tok.save(model_dir)
    # speculative: a step may add several tokens to a sequence, which streaming must handle
    llm = LLM(model_dir, device="cpu", dtype=torch.float32, kv_cache_bytes=1 << 20, block_size=4, speculative=True)
    patch = pytest.MonkeyPatch()
    patch.setattr(llm_module, "propose", oracle_drafts(model, llm_module.propose))
    app = build_app(llm.engine, NAME, api_key=KEY, max_body_bytes=64 * 1024)
    server, thread, port = start_server(app)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    yield dict(model=model, tok=tok, engine=llm.engine, port=port, client=client)
    server.should_exit = True
    thread.join(30)
    patch.undo()


def raw(srv, method, path, body=None, headers=None, key=KEY):
    """(status, parsed JSON or text) of one request over a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", srv["port"], timeout=60)
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    conn.request(method, path, body=json.dumps(body).encode() if isinstance(body, dict) else body, headers=h)
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(data)
    except json.JSONDecodeError:
        return resp.status, data


def metrics(srv) -> dict:
    status, text = raw(srv, "GET", "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in prom_parser.text_string_to_metric_families(text) for s in fam.samples}


def expected(srv, prompt_ids, n):
    return decode_stable(srv["tok"], naive_greedy(srv["model"], prompt_ids, n))


def assert_still_serving(srv):
    out = srv["client"].completions.create(model=NAME, prompt="def f2(x):", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1 and out.choices[0].finish_reason in ("stop", "length")
    engine = srv["engine"]
    wait_for(lambda: engine.blocks.num_free_blocks == len(engine.blocks.blocks), "all blocks to be free")


GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


# ---- the happy paths -----------------------------------------------------------------------------
def test_health_and_models(srv):
    assert raw(srv, "GET", "/health", key=None)[0] == 200  # open without the key
    assert [m.id for m in srv["client"].models.list().data] == [NAME]


def test_completion_greedy_equals_naive_loop(srv):
    tok, client = srv["tok"], srv["client"]
    out = client.completions.create(model=NAME, prompt="def f1(x):", max_tokens=8, **GREEDY)
    ids = tok.encode("def f1(x):")
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == NAME
    assert out.choices[0].text == expected(srv, ids, 8)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(ids), 8, len(ids) + 8)

    # a batch of prompts (text and token ids) × n: choice index = prompt × n + sample
    out = client.completions.create(model=NAME, prompt=[[5, 6, 7], [40, 41, 42, 43]], n=2, max_tokens=5, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [expected(srv, [5, 6, 7], 5)] * 2 + [expected(srv, [40, 41, 42, 43], 5)] * 2
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (7, 20)


@pytest.mark.parametrize("sampling", [GREEDY, dict(temperature=0.9, top_p=0.9, seed=3)])
def test_stream_concatenates_to_the_non_streamed_text(srv, sampling):
    client, engine = srv["client"], srv["engine"]
    full = client.completions.create(model=NAME, prompt="def f7(x):", max_tokens=12, **sampling)
    accepted = engine.num_accepted
    chunks = list(client.completions.create(model=NAME, prompt="def f7(x):", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **sampling))
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choices) == full.choices[0].text
    assert with_choices[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    if sampling is GREEDY:  # drafts were kept: some steps added two tokens, so some deltas span two tokens
        assert engine.num_accepted >= accepted + 3


def test_chat_streamed_and_not(srv):
    tok, client = srv["tok"], srv["client"]
    messages = [{"role": "user", "content": "def f3(x):"}]
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, **GREEDY)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected(srv, ids, 10)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 10)

    parts = [{"role": "user", "content": [{"type": "text", "text": "def f3"}, {"type": "text", "text": "(x):"}]}]
    chunks = list(client.chat.completions.create(model=NAME, messages=parts, max_completion_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == out.choices[0].message.content
    assert body[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_strings_are_never_streamed(srv):
    client = srv["client"]
    text = client.completions.create(model=NAME, prompt="def f5(x):", max_tokens=24, **GREEDY).choices[0].text
    clean = [i for i in range(4, len(text) - 3) if "\ufffd" not in text[i:i + 3]]
    stop = text[clean[len(clean) // 2]:][:3]  # three characters from the middle of the greedy text
    want = text[:text.find(stop)]
    for stream in (False, True):
        r = client.completions.create(model=NAME, prompt="def f5(x):", max_tokens=24, stop=[stop, "\x00never"],
                                      stream=stream, **GREEDY)
        got = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        assert got == want and stop not in got


def test_streamable_holds_back_a_possible_stop_prefix():
    assert streamable("hello wo", ["world"]) == "hello "
    assert streamable("hello world!", ["world"]) == "hello "
    assert streamable("hello", ["xyz", "lo!"]) == "hel"
    assert streamable("hello", []) == "hello"


def test_logprobs(srv):
    client = srv["client"]
    full = client.completions.create(model=NAME, prompt="def f4(x):", max_tokens=6, logprobs=2, **GREEDY)
    lp = full.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(1 <= len(top) <= 2 and max(top.values()) >= chosen  # greedy: the chosen token is the best
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    assert all(v <= 0 for v in lp.token_logprobs) and lp.text_offset == sorted(lp.text_offset)
    streamed = list(client.completions.create(model=NAME, prompt="def f4(x):", max_tokens=6, logprobs=2,
                                              stream=True, **GREEDY))
    # the same tokens' log-probs (to rounding: the second request's prompt comes from the prefix cache)
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == \
        pytest.approx(lp.token_logprobs, abs=1e-5)

    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 3 and t.logprob == t.top_logprobs[0].logprob for t in content)


def test_concurrent_streams_match_their_solo_results(srv):
    client = srv["client"]
    jobs = [dict(prompt=[5 + i, 6 + i, 7 + i], **GREEDY) for i in range(8)]
    jobs += [dict(prompt=f"def f{i}(x):", temperature=1.0, seed=i, extra_body={"ignore_eos": True}) for i in range(8)]

    def run(job, stream):
        r = client.completions.create(model=NAME, max_tokens=8, stream=stream, **job)
        return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

    solo = [run(job, False) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: run(job, True), jobs))
    assert together == solo
    assert solo[:8] == [expected(srv, job["prompt"], 8) for job in jobs[:8]]


def test_client_disconnect_aborts_and_frees_blocks(srv):
    engine, before = srv["engine"], metrics(srv)
    conn = http.client.HTTPConnection("127.0.0.1", srv["port"], timeout=60)
    body = dict(model=NAME, prompt="def f6(x):", max_tokens=CONTEXT, stream=True, ignore_eos=True, temperature=0)
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    events = 0
    while events < 2:  # a couple of chunks: the request is running in the engine
        events += resp.readline().startswith(b"data: ")
    assert engine.blocks.num_free_blocks < len(engine.blocks.blocks)
    conn.close()
    wait_for(lambda: not engine.scheduler.running and not engine.scheduler.waiting
             and engine.blocks.num_free_blocks == len(engine.blocks.blocks), "the aborted request's blocks")
    after = metrics(srv)
    aborts = ("deepmoe_requests_total", (("finish_reason", "abort"),))
    lengths = ("deepmoe_requests_total", (("finish_reason", "length"),))
    assert after[aborts] == before.get(aborts, 0) + 1 and after.get(lengths) == before.get(lengths)


# ---- errors --------------------------------------------------------------------------------------
def _body(**kw):
    return {"model": NAME, "prompt": "def f1(x):", "max_tokens": 2, **kw}


BAD_REQUESTS = [
    (b'{"model": "tiny-serve", "prompt": "x",', 400, None),  # malformed JSON
    ({"model": NAME, "max_tokens": 2}, 400, "prompt"),  # missing field
    (_body(max_tokens="lots"), 400, "max_tokens"),  # wrong type
    (_body(prompt=7), 400, "prompt"),
    (_body(model="gpt-4"), 404, "model"),
    (_body(prompt=[5] * CONTEXT), 400, None),  # as long as the context: no room to generate
    (_body(max_tokens=0), 400, None),
    (_body(temperature=-1), 400, None),
    (_body(top_p=0), 400, None),
    (_body(top_p=1.5), 400, None),
    (_body(n=0), 400, None),
    (_body(echo=True), 400, None),
    (_body(prompt=[1, 2, 10**6]), 400, "prompt"),  # a token id outside the vocabulary
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(srv, body, status, param):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    got, err = raw(srv, "POST", path, body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param
    if status == 404:
        assert err["error"]["code"] == "model_not_found"
    assert_still_serving(srv)


def test_body_limit_and_api_key(srv):
    big = json.dumps(_body(prompt="x" * 100_000)).encode()
    status, err = raw(srv, "POST", "/v1/completions", big)  # refused on Content-Length
    assert status == 413 and err["error"]["code"] == "request_too_large"
    conn = http.client.HTTPConnection("127.0.0.1", srv["port"], timeout=60)  # no length: refused on bytes read
    conn.request("POST", "/v1/completions", iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                 {"Authorization": f"Bearer {KEY}", "Transfer-Encoding": "chunked", "Content-Type": "application/json"},
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()

    status, err = raw(srv, "POST", "/v1/completions", _body(), headers={"Content-Type": "text/plain"})
    assert status == 400 and "Content-Type: application/json" in err["error"]["message"]

    for key in ("wrong", None):
        status, err = raw(srv, "POST", "/v1/completions", _body(), key=key)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert raw(srv, "GET", "/metrics", key=key)[0] == 401
    bad_client = openai.OpenAI(base_url=srv["client"].base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()
    with pytest.raises(openai.NotFoundError):
        srv["client"].completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        srv["client"].completions.create(model=NAME, prompt="x", temperature=-1)
    assert_still_serving(srv)


def test_an_engine_failure_fails_its_requests_with_500_and_serving_goes_on(srv, monkeypatch):
    engine = srv["engine"]
    real_step = engine.step

    def broken_step():
        monkeypatch.setattr(engine, "step", real_step)  # fail once
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine, "step", broken_step)
    status, err = raw(srv, "POST", "/v1/completions", _body())
    assert status == 500 and err["error"]["type"] == "server_error" and "injected failure" in err["error"]["message"]
    assert_still_serving(srv)


# ---- operations ----------------------------------------------------------------------------------
def test_metrics_move(srv):
    before = metrics(srv)
    srv["client"].completions.create(model=NAME, prompt="def f8(x):", max_tokens=5, **GREEDY)
    after = metrics(srv)
    for name in ("deepmoe_num_sequences_waiting", "deepmoe_num_sequences_running", "deepmoe_kv_cache_usage_ratio",
                 "deepmoe_generation_tokens_per_second", "deepmoe_e2e_request_latency_seconds_count"):
        assert (name, ()) in after
    assert after[("deepmoe_generation_tokens_total", ())] == before[("deepmoe_generation_tokens_total", ())] + 5
    assert after[("deepmoe_prompt_tokens_total", ())] > before[("deepmoe_prompt_tokens_total", ())]
    assert after[("deepmoe_time_to_first_token_seconds_count", ())] == \
        before[("deepmoe_time_to_first_token_seconds_count", ())] + 1
    length = ("deepmoe_requests_total", (("finish_reason", "length"),))
    assert after[length] == before.get(length, 0) + 1


def test_graceful_shutdown_finishes_in_flight_requests(srv):
    engine = LLMEngine(srv["model"], srv["tok"], kv_cache_bytes=1 << 20, block_size=4)
    app = build_app(engine, NAME)
    server, thread, port = start_server(app)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.completions.create, model=NAME, prompt=[5, 6, 7], max_tokens=60, **GREEDY)
        wait_for(lambda: engine.scheduler.running, "the request to run")
        server.should_exit = True  # what SIGINT/SIGTERM do
        out = pending.result()
    thread.join(30)
    assert not thread.is_alive()
    assert out.choices[0].text == expected(srv, [5, 6, 7], 60)
    assert not app.state.server.bridge.running  # the lifespan stopped the engine thread after the drain


def test_the_core_package_does_not_import_the_server_stack():
    code = ("import sys, deepmoe, deepmoe.cli, deepmoe.engine.llm; deepmoe.cli.build_parser(); "
            "print([m for m in ('fastapi', 'uvicorn', 'prometheus_client') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
