"""`deepmoe serve` live on loopback: a real uvicorn server over a tiny random model saved to a directory and
loaded back, driven by the official openai client (and raw HTTP where the client cannot misbehave enough).
Greedy output equals a naive full-recompute loop; streams concatenate to the non-streamed text; stop text
is never streamed; errors are OpenAI-shaped with the right status and leave the server serving; a client
that disconnects mid-stream gets its request aborted and its KV blocks freed."""

import http.client
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from deepmoe.engine.llm import LLMEngine

from .serving import (CONTEXT, GREEDY, KEY, NAME, assert_openai_error, assert_still_serving, completion, expected,
                      http_client, live_server, metrics, openai, raw, start_server, wait_for)

from deepmoe.serve.app import build_app  # noqa: E402  (imported after .serving, which skips without fastapi)
from deepmoe.serve.async_engine import streamable  # noqa: E402


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    yield from live_server(tmp_path_factory)


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


def test_tiny_temperatures_are_greedy(srv):
    """temperature 1e-39 used to overflow logits / T to inf and sample from nan (issue 17): now it is greedy,
    streamed and not, alongside other requests."""
    client, prompts = srv["client"], [[5, 6, 7], [9, 10], [40, 41, 42]]

    def run(prompt, temperature, stream):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=temperature,
                                      stream=stream, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

    jobs = [(p, t, stream) for p, t in zip(prompts, (1e-39, 5e-324, 1e-30)) for stream in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda job: run(*job), jobs))
    assert texts == [expected(srv, p, 10) for p, _, _ in jobs]


def test_client_disconnect_aborts_and_frees_blocks(srv):
    engine, before = srv["engine"], metrics(srv)
    conn = http.client.HTTPConnection("127.0.0.1", srv["port"], timeout=60)
    body = dict(model=NAME, prompt="def f6(x):", max_tokens=CONTEXT - 32, stream=True, ignore_eos=True, temperature=0)
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
BAD_REQUESTS = [
    (b'{"model": "tiny-serve", "prompt": "x",', 400, None),  # malformed JSON
    ({"model": NAME, "max_tokens": 2}, 400, "prompt"),  # missing field
    (completion(max_tokens="lots"), 400, "max_tokens"),  # wrong type
    (completion(prompt=7), 400, "prompt"),
    (completion(model="gpt-4"), 404, "model"),
    (completion(prompt=[5] * CONTEXT), 400, "prompt"),  # as long as the context: no room to generate
    (completion(max_tokens=0), 400, None),
    (completion(temperature=-1), 400, None),
    (completion(top_p=0), 400, None),
    (completion(top_p=1.5), 400, None),
    (completion(n=0), 400, None),
    (completion(echo=True), 400, None),
    (completion(prompt=[1, 2, 10**6]), 400, "prompt"),  # a token id outside the vocabulary
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    (completion(max_tokens=2**64), 400, "max_tokens"),
    (completion(seed=2**64), 400, "seed"),
    (completion(prompt="\ud800"), 400, "prompt"),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(srv, body, status, param):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    got, err = raw(srv, "POST", path, body)
    assert got == status, err
    assert_openai_error(err, status, param)
    if status == 404:
        assert err["error"]["code"] == "model_not_found"
    assert_still_serving(srv)


def chat(content="def f3(x):", role="user", **kw):
    return {"model": NAME, "messages": [{"role": role, "content": content}], "max_tokens": 2, **kw}


def test_lone_surrogates_are_a_400_and_the_connection_stays_open(srv):
    """JSON can escape a lone UTF-16 surrogate, which no tokenizer can encode: a 400 naming the field, on a
    keep-alive connection that then serves the next request (one connection throughout)."""
    bad = [("/v1/completions", completion(prompt="def \ud800 f"), "prompt"),
           ("/v1/completions", completion(prompt=["ok", "\udfff"]), "prompt"),
           ("/v1/completions", completion(stop=["\ud800"]), "stop"),
           ("/v1/chat/completions", chat("\ud800"), "messages"),
           ("/v1/chat/completions", chat([{"type": "text", "text": "a\udbffb"}]), "messages")]
    with http_client(srv["port"]) as http:
        first = None
        for path, body, param in bad:
            r = http.post(path, content=json.dumps(body))  # json.dumps escapes the surrogate as \uXXXX
            assert r.status_code == 400, r.text
            assert "lone UTF-16 surrogate" in assert_openai_error(r.json(), 400, param)["message"]
            ok = http.post("/v1/completions", content=json.dumps(completion()))
            assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
            first = first or r.extensions["network_stream"]
            assert r.extensions["network_stream"] is ok.extensions["network_stream"] is first
        # a surrogate pair is valid text: an emoji goes through
        assert http.post("/v1/completions", content=json.dumps(completion(prompt="\ud83d\ude00"))).status_code == 200


def test_an_internal_error_is_a_500_and_the_connection_stays_open(srv, monkeypatch):
    tok = srv["engine"].tokenizer
    encode = tok.encode

    def broken(text, *a, **kw):
        if "crash" in text:
            raise RuntimeError("injected tokenizer crash")
        return encode(text, *a, **kw)

    monkeypatch.setattr(tok, "encode", broken)
    with http_client(srv["port"]) as http:
        r = http.post("/v1/completions", content=json.dumps(completion(prompt="crash")))
        assert r.status_code == 500 and "injected tokenizer crash" in assert_openai_error(r.json(), 500)["message"]
        ok = http.post("/v1/completions", content=json.dumps(completion()))
        assert ok.status_code == 200 and ok.extensions["network_stream"] is r.extensions["network_stream"]


def test_chat_roles_are_checked_by_the_schema(srv, monkeypatch):
    """Roles are validated even when the chat template would render any role; developer messages reach the
    template as system messages (templates know no other name for them)."""
    tok, client = srv["engine"].tokenizer, srv["client"]
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    for role in ("wizard", "System", ""):
        status, err = raw(srv, "POST", "/v1/chat/completions", chat(role=role))
        assert status == 400 and f"unknown role {role!r}" in assert_openai_error(err, 400, "messages")["message"]
    roles = ["system", "developer", "user", "assistant", "tool", "user"]
    messages = [{"role": r, "content": f"m{i}"} for i, r in enumerate(roles)]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=2, **GREEDY)
    rendered = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
    assert out.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(rendered)))


def test_the_bearer_scheme_is_case_insensitive(srv):
    for header in (f"bearer {KEY}", f"BEARER {KEY}", f"bEaReR {KEY}", f"Bearer  {KEY}"):
        assert raw(srv, "GET", "/v1/models", headers={"Authorization": header}, key=None)[0] == 200, header
    for header in (f"Basic {KEY}", "Bearer", f"Bearer{KEY}", f"bearer {KEY.upper()}", f"Bearer {KEY}x"):
        status, err = raw(srv, "GET", "/v1/models", headers={"Authorization": header}, key=None)
        assert status == 401 and err["error"]["code"] == "invalid_api_key", header


def test_max_tokens_beyond_the_context_and_seeds_beyond_64_bits_are_400s(srv):
    """max_tokens must fit in the context after the prompt (OpenAI's rule; not clamped); the seed is a 64-bit
    signed integer, and the error says so."""
    client, tok = srv["client"], srv["tok"]
    room = CONTEXT - len(tok.encode("def f1(x):"))
    for path, body, param in [("/v1/completions", completion(max_tokens=2**64), "max_tokens"),
                              ("/v1/completions", completion(max_tokens=room + 1), "max_tokens"),
                              ("/v1/chat/completions", chat(max_tokens=2**64), "max_tokens"),
                              ("/v1/chat/completions", chat(max_completion_tokens=CONTEXT), "max_completion_tokens")]:
        status, err = raw(srv, "POST", path, body)
        e = assert_openai_error(err, 400, param)
        assert status == 400 and e["code"] == "context_length_exceeded" and f"{CONTEXT} tokens" in e["message"]
    out = client.completions.create(model=NAME, prompt="def f1(x):", max_tokens=room, **GREEDY)  # exactly fits
    assert out.usage.completion_tokens == room and out.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="at most"):
        client.completions.create(model=NAME, prompt="def f1(x):", max_tokens=2**64)

    for seed in (2**63, -2**63 - 1, 2**64):
        status, err = raw(srv, "POST", "/v1/completions", completion(seed=seed, temperature=1))
        message = assert_openai_error(err, 400, "seed")["message"]
        assert status == 400 and "[-9223372036854775808, 9223372036854775807]" in message
    for seed in (2**63 - 1, -2**63):  # the ends of the range are seeds like any other
        assert client.completions.create(model=NAME, prompt="x", max_tokens=2, seed=seed, temperature=1).choices
    with pytest.raises(openai.BadRequestError, match="64-bit"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], seed=2**64)


def test_body_limit_and_api_key(srv):
    big = json.dumps(completion(prompt="x" * 100_000)).encode()
    status, err = raw(srv, "POST", "/v1/completions", big)  # refused on Content-Length
    assert status == 413 and err["error"]["code"] == "request_too_large"
    conn = http.client.HTTPConnection("127.0.0.1", srv["port"], timeout=60)  # no length: refused on bytes read
    conn.request("POST", "/v1/completions", iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                 {"Authorization": f"Bearer {KEY}", "Transfer-Encoding": "chunked", "Content-Type": "application/json"},
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()

    status, err = raw(srv, "POST", "/v1/completions", completion(), headers={"Content-Type": "text/plain"})
    assert status == 400 and "Content-Type: application/json" in err["error"]["message"]

    for key in ("wrong", None):
        status, err = raw(srv, "POST", "/v1/completions", completion(), key=key)
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
    status, err = raw(srv, "POST", "/v1/completions", completion())
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
