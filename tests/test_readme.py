"""Every ```python block of README.md runs as written, so a README example cannot crash unnoticed.

The blocks name `runs/tiny/final`, what `deepmoe train` writes: each runs in a fresh directory where a tiny
random model with a trained tokenizer stands at that path. The client block talks to `deepmoe serve`,
started here on a free port (the only change made to a block is that port in its base_url).
"""

import re
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from deepmoe.checkpoint import save_pretrained
from deepmoe.model import build_model
from deepmoe.tokenizer import train_bpe

from .conftest import v3_config

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S)
SERVER_URL = "http://127.0.0.1:8000"


def test_the_readme_has_its_python_blocks():
    # the extraction itself must not silently find nothing: the README has a load/save, an LLM and a client block
    assert len(BLOCKS) >= 3 and any("OpenAI(" in b for b in BLOCKS) and any("LLM(" in b for b in BLOCKS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    path = root / "runs" / "tiny" / "final"
    tok = train_bpe([f"def f{i}(x):\n    return x * {i}\n" for i in range(40)], 300)
    save_pretrained(build_model(v3_config(vocab_size=tok.vocab_size), seed=0), path)
    tok.save(path)
    return path


def serve(model_dir: Path):
    """deepmoe's server on the model, in a thread, on a socket bound here (port 0: no race for a port)."""
    uvicorn = pytest.importorskip("uvicorn")
    from deepmoe.engine.llm import LLM
    from deepmoe.serve.app import build_app

    llm = LLM(model_dir, device="cpu", kv_cache_bytes=1 << 22)
    server = uvicorn.Server(uvicorn.Config(build_app(llm.engine, model_dir.name), log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, model_dir, tmp_path, monkeypatch):
    code = BLOCKS[index]
    work = tmp_path / "cwd"
    (work / "runs" / "tiny").mkdir(parents=True)
    (work / "runs" / "tiny" / "final").symlink_to(model_dir)
    monkeypatch.chdir(work)
    torch.manual_seed(0)
    if "OpenAI(" not in code:
        exec(compile(code, f"README.md python block {index}", "exec"), {})
        return
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    assert SERVER_URL in code
    server, thread, url = serve(model_dir)
    try:
        exec(compile(code.replace(SERVER_URL, url), f"README.md python block {index}", "exec"), {})
    finally:
        server.should_exit = True
        thread.join(30)
