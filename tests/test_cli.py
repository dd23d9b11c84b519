"""The `deepmoe` command line: help with defaults and choices for every flag, one way to name a model,
arguments checked before anything is loaded (one line, exit code 2), and `generate` through the engine
(streamed as it is made, --chat, --speculative)."""

import argparse

import pytest
import torch

import deepmoe
from deepmoe.checkpoint import save_pretrained
from deepmoe.cli import build_parser, main, parse_args
from deepmoe.engine.llm import LLM
from deepmoe.engine.sequence import SamplingParams
from deepmoe.model import build_model
from deepmoe.tokenizer import train_bpe

from .conftest import v3_config

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 5}\n" for i in range(60)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_bpe(TEXTS, 300)
    model = build_model(v3_config(vocab_size=tok.vocab_size), seed=1)
    with torch.no_grad():  # a stronger head than init's spreads the logits: no near-ties for greedy to part at
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("model")
    save_pretrained(model, path)
    tok.save(path)
    return path


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def help_entry(help_text: str, option: str) -> tuple[str, str]:
    """What `--help` shows for one option: the flags as written ("--dtype {bf16,fp16,fp32}") and its help."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().split()[:1] in ([option], [option + ","]))
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("  -") or not lines[j].strip()),
               len(lines))
    # argparse puts the help two or more spaces after the flags, or on the lines below them
    flags, _, first = lines[start].strip().partition("  ")
    return flags, " ".join([first.strip(), *(line.strip() for line in lines[start + 1:end])]).strip()


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_explains_itself_with_its_default(command):
    parser = subcommands()[command]
    text = parser.format_help()
    options = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]
    assert options
    for action in options:
        name = f"deepmoe {command} {action.option_strings[0]}"
        flags, entry = help_entry(text, action.option_strings[0])
        assert len(entry) > 10, f"{name}: no help"
        assert "default" in entry or "(required" in entry, f"{name}: no default in {entry!r}"
        if action.choices:
            assert "{" + ",".join(map(str, action.choices)) + "}" in flags, f"{name}: choices not listed"
    for action in parser._actions:  # positionals too: what is MODEL_DIR?
        assert action.help, f"deepmoe {command} {action.dest}: no help"


def test_choices_are_listed_where_there_are_some():
    listed = {name: {a.dest: list(a.choices) for a in p._actions if a.choices} for name, p in subcommands().items()}
    for command in ("generate", "eval", "serve", "convert"):
        assert listed[command]["dtype"] == ["bf16", "fp16", "fp32"]
    assert listed["train"]["schedule"] == ["multistep", "cosine", "constant"]
    assert listed["train"]["precision"] == ["auto", "fp32", "bf16", "fp8"]
    assert "tiny" in listed["train"]["preset"] and "deepseek-v3" in listed["info"]["preset"]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"deepmoe {deepmoe.__version__} (torch {torch.__version__})")


def test_a_model_directory_is_named_the_same_way_everywhere(model_dir):
    d = str(model_dir)
    for command, rest in (("generate", ["--prompt", "x"]), ("eval", []), ("serve", []), ("info", [])):
        positional, flag = parse_args([command, d, *rest]), parse_args([command, "--model", d, *rest])
        assert positional.model == flag.model == d
    # one default for the engine's entry points and eval: the checkpoint's own dtype (it was fp32 for
    # generate and eval, the checkpoint's for serve)
    assert {parse_args([c, d, *r]).dtype for c, r in (("generate", ["--prompt", "x"]), ("eval", []), ("serve", []))} \
        == {None}


def _refuse_loading(monkeypatch):
    # the checks must come before the model is read: loading a real checkpoint takes minutes
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr("deepmoe.engine.llm.LLM", refuse)
    monkeypatch.setattr("deepmoe.checkpoint.load_pretrained", refuse)


BAD_ARGUMENTS = [
    (["generate", "{model}", "--prompt", ""], "argument --prompt: must not be empty"),
    (["generate", "{model}", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens: must be >= 1, got -1"),
    (["generate", "{model}", "--prompt", "x", "--max-new-tokens", "many"], "expected an integer, got 'many'"),
    # the sampling parameters go through SamplingParams, the check LLM and the server apply
    (["generate", "{model}", "--prompt", "x", "--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    (["generate", "{model}", "--prompt", "x", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["generate", "{model}", "--prompt", "x", "--top-k", "-3"], "top_k must be >= 0"),
    (["generate", "{model}", "--prompt", "x", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["generate", "--prompt", "x"], "give the model directory: deepmoe generate MODEL_DIR (or --model MODEL_DIR)"),
    (["generate", "{model}", "--model", "{model}", "--prompt", "x"], "not allowed with"),
    (["generate", "{missing}", "--prompt", "x"], "is not a directory"),
    (["eval", "--model", "{missing}"], "is not a directory"),
    (["eval", "{run}"], "holds no config.json, so it is not a model directory; did you mean"),
    (["eval", "{model}", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["eval", "{model}", "--data", "{missing}"], "--data: '{missing}' does not exist"),
    (["serve", "{missing}"], "is not a directory"),
    (["serve", "{model}", "--port", "70000"], "--port: must be in [1, 65535], got 70000"),
    (["serve", "{model}", "--max-num-seqs", "0"], "--max-num-seqs: must be >= 1"),
    (["info", "--model", "{missing}"], "is not a directory"),
    (["info", "--preset", "nope"], "invalid choice: 'nope'"),
    (["info", "--preset", "deepseek-v3", "--plan", "pp=16,ep=48,dp=96"],
     "ep=48 does not divide the 256 routed experts"),
    (["info", "--preset", "deepseek-v3", "--plan", "pp=64"],
     "pp=64 is more pipeline stages than the model's 61 layers"),
    (["info", "--preset", "deepseek-v3", "--plan", "ep=64,dp=32"], "ep=64 must divide dp=32"),
    (["info", "--plan", "pp=2,tp=2"], "argument --plan: cannot read 'tp=2'"),
    (["info", "--seq-len", "8192"], "--seq-len: only with a parallelism plan; add --plan pp=N,ep=N,dp=N"),
    (["info", "--plan", "ep=2,dp=2", "--weights", "fp4"], "invalid choice: 'fp4'"),
    (["convert", "{missing}", "{out}"], "argument src: '{missing}' is not a directory"),
    (["convert", "{model}", "{out}", "--max-shard-size", "5XB"], "cannot parse size '5XB'"),
    (["train", "--schedule", "linear"], "invalid choice: 'linear'"),
]


@pytest.mark.parametrize("argv,message", BAD_ARGUMENTS, ids=[" ".join(a[:3]) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_errors(argv, message, model_dir, tmp_path, monkeypatch, capsys):
    _refuse_loading(monkeypatch)
    (tmp_path / "run" / "final").mkdir(parents=True)  # a training run's directory: the model is in final/
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    paths = dict(model=str(model_dir), missing=str(tmp_path / "missing"), run=str(tmp_path / "run"),
                 out=str(tmp_path / "out"))
    assert main([a.format(**paths) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"deepmoe {argv[0]}: error: ") and err.count("\n") == 1, err
    assert message.format(**paths) in err
    assert not out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["generate", "eval", "serve", "train"])
def test_a_cuda_device_without_cuda_is_refused_up_front(command, model_dir, monkeypatch, capsys):
    _refuse_loading(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a CPU-only torch or machine says
    argv = {"generate": [str(model_dir), "--prompt", "x"], "eval": [str(model_dir)], "serve": [str(model_dir)],
            "train": ["--steps", "1"]}[command]
    assert main([command, *argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deepmoe {command}: error: argument --device: cuda: ") and "use --device cpu" in err
    assert err.count("\n") == 1


def test_info_plan_prints_the_arithmetic(capsys):
    argv = ["info", "--preset", "deepseek-v3", "--plan", "pp=16,ep=64,dp=128", "--global-batch", "15360",
            "--weights", "fp8", "--moments", "bf16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out  # the counts come first, as without --plan
    assert "arithmetic, not measured: 2048 GPUs = pp 16 x dp 128" in out and "AdamW moments bf16" in out
    assert "at most 27.2 GB with every layer checkpointed (stage 15)" in out
    assert parse_args(["info", "--plan", "dp=8"]).plan == {"dp": 8}


STREAM = LLM.stream  # the engine's, whatever a test has patched in


def _generate_printing(monkeypatch, capsys, argv):
    """Run `deepmoe generate`, recording what it had printed each time the engine made the next piece."""
    printed, pieces = [], []

    def spy(self, prompt, params):
        for piece in STREAM(self, prompt, params):
            printed.append(capsys.readouterr().out)
            pieces.append(piece)
            yield piece

    monkeypatch.setattr(LLM, "stream", spy)
    assert main(["generate", *argv]) == 0
    return "".join(printed) + capsys.readouterr().out, printed, pieces


def test_generate_streams_what_the_engine_makes(model_dir, monkeypatch, capsys):
    llm = LLM(model_dir, device="cpu")
    for flags, params in (([], SamplingParams(temperature=0, max_tokens=12)),
                          (["--temperature", "0.9", "--top-p", "0.9", "--seed", "3"],
                           SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, seed=3))):
        expected = llm.generate("def f1(x):", params)[0].text
        out, printed, pieces = _generate_printing(
            monkeypatch, capsys, [str(model_dir), "--prompt", "def f1(x):", "--max-new-tokens", "12", *flags])
        assert out == "def f1(x):" + expected + "\n"
        # the prompt first, and every piece on the screen before the next one is made
        assert len(pieces) > 2 and printed == ["def f1(x):", *pieces[:-1]]


def test_generate_chat_answers_through_the_chat_template(model_dir, monkeypatch, capsys):
    llm = LLM(model_dir, device="cpu")
    reply = llm.chat([{"role": "user", "content": "def f2"}], SamplingParams(temperature=0, max_tokens=10)).text
    out, _, _ = _generate_printing(monkeypatch, capsys,
                                   [str(model_dir), "--prompt", "def f2", "--chat", "--max-new-tokens", "10"])
    assert out == reply + "\n"  # the reply alone: neither the prompt nor the template is echoed


def test_generate_speculative_gives_the_same_greedy_text(model_dir, monkeypatch, capsys):
    argv = [str(model_dir), "--prompt", "def f1(x):", "--max-new-tokens", "16"]
    plain, _, _ = _generate_printing(monkeypatch, capsys, argv)
    drafted, _, _ = _generate_printing(monkeypatch, capsys, argv + ["--speculative"])
    assert drafted == plain and len(plain) > len("def f1(x):\n")

