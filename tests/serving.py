"""The live server the server tests drive: a tiny random model saved to a directory and loaded back, served on
loopback by the real uvicorn server (`deepmoe.serve.server.make_server`) in a background thread, plus the
helpers the tests share. Importing this module skips the importing test module without the server extra."""

import http.client
import json
import socket
import threading
import time

import pytest
import torch

import deepmoe.engine.llm as llm_module
from deepmoe.checkpoint import save_pretrained
from deepmoe.engine.detokenizer import decode_stable
from deepmoe.engine.llm import LLM
from deepmoe.model import build_model
from deepmoe.tokenizer import train_bpe

from .conftest import naive_greedy, v3_config

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
prom_parser = pytest.importorskip("prometheus_client.parser")
try:
    import httpx
except ImportError:  # the openai client's HTTP library, under the name its successor took
    httpx = pytest.importorskip("httpx2")

from deepmoe.serve.app import build_app  # noqa: E402  (needs fastapi, skipped above without it)
from deepmoe.serve.limits import ServerLimits  # noqa: E402
from deepmoe.serve.server import make_server  # noqa: E402

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 5}\n" for i in range(60)]
KEY, NAME = "sk-test", "tiny-serve"
CONTEXT = 512
# small enough that the tests reach every limit with a few requests
LIMITS = ServerLimits(max_body_bytes=64 * 1024, max_prompts_per_request=8, max_seqs_per_request=16,
                      max_waiting_seqs=64, read_timeout_s=2.0)
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def start_server(app):
    """The server in a background thread on a socket bound here (port 0: no race for a free port)."""
    server = make_server(app, log_level="warning")
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


def live_server(tmp_path_factory):
    """The body of each server test module's `srv` fixture: yields what the tests use, then shuts down."""
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
    app = build_app(llm.engine, NAME, api_key=KEY, limits=LIMITS)
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


def http_client(port, key=KEY):
    """An httpx client on the server: one connection reused while the server keeps it open."""
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def sse_data(lines) -> list[str]:
    """The data fields of a server-sent event stream's lines."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def assert_openai_error(body: dict, status: int, param=None) -> dict:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error") and err["param"] == param
    return err


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


def completion(**kw):
    """A completions request body: the defaults, overridden by kw."""
    return {"model": NAME, "prompt": "def f1(x):", "max_tokens": 2, **kw}
