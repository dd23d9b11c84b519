"""Tokenizer wrapper: BPE training, exact round trips, save/load, transformers interop, chat templates, errors."""

import json
import os
import random

import pytest

from deepmoe.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, load_tokenizer, train_bpe

VOCAB = 600

TRICKY = [
    "",
    " ",
    "    leading spaces and trailing   ",
    "def f(x):\n    if x:\n\t\treturn x  # tab-indented\n",
    "windows\r\nline\r\nendings\r\n",
    "naïve café, Straße, 日本語のテキスト, Ελληνικά, עברית, العربية",
    "emoji 🙂👍🏽👨‍👩‍👧 and flags 🇫🇷",
    "control \x00\x01\x7f and combining e\u0301",
    "unseen words: zyxqwv QQQQ 1234567890",
    "literal special <|bos|>inside<|eos|> text",
]


def _corpus(n=300, seed=0):
    rng = random.Random(seed)
    names = ["value", "result", "items", "count", "data", "index", "total", "name", "x", "y"]
    lines = []
    for i in range(n):
        a, b = rng.sample(names, 2)
        lines.append(
            f"def {a}_{i}({b}, *args):\n"
            f"    \"\"\"Return {b} plus {rng.randint(0, 999)}.\"\"\"\n"
            f"    for k in range(len({b})):\n"
            f"        {a} = {b}[k] + {rng.random():.3f}  # héllo wörld 🙂\n"
            f"    return {a}\r\n\n"
        )
    return lines


@pytest.fixture(scope="module")
def tok():
    return train_bpe(iter(_corpus()), VOCAB)


def _write_config(directory, **fields):
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps(fields), encoding="utf-8")
    return path


# --- training and encoding ---------------------------------------------------------------------------

def test_train_vocab_and_special_ids(tok):
    assert 256 + 3 < tok.vocab_size <= VOCAB
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    # the corpus' frequent pieces were merged, so common text is shorter than its byte count
    text = "    return value\n"
    assert len(tok.encode(text)) < len(text.encode())


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_exact(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_bos_and_special_tokens(tok):
    ids = tok.encode("hello", add_bos=True)
    assert ids[0] == tok.bos_id and ids[1:] == tok.encode("hello")
    assert tok.decode(ids) == "<|bos|>hello"
    assert tok.decode(ids, skip_special_tokens=True) == "hello"
    # special tokens written in the text are atomic
    assert tok.encode("<|eos|>") == [tok.eos_id]
    # tensors / numpy scalars decode too
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor(ids)) == "<|bos|>hello"


def test_train_validation():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], 100)
    with pytest.raises(ValueError, match="special_tokens"):
        train_bpe(["abc"], 300, special_tokens=("<|bos|>",))
    small = train_bpe(["abc abc"], 300, special_tokens=("<s>", "</s>"))
    assert small.pad_token is None and small.pad_id is None and (small.bos_id, small.eos_id) == (0, 1)


# --- save / load -------------------------------------------------------------------------------------

def test_save_load_identical(tok, tmp_path):
    out = tmp_path / "tok"
    tok.model_max_length = 4096
    try:
        tok.save(out)
    finally:
        tok.model_max_length = None
    assert sorted(os.listdir(out)) == ["tokenizer.json", "tokenizer_config.json"]  # no temp files left behind
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert cfg["model_max_length"] == 4096 and cfg["chat_template"] == tok.chat_template

    loaded = load_tokenizer(out)
    assert isinstance(loaded, Tokenizer) and loaded.vocab_size == tok.vocab_size
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2)
    assert loaded.chat_template == tok.chat_template and loaded.model_max_length == 4096
    for text in TRICKY + _corpus(5, seed=1):
        assert loaded.encode(text, add_bos=True) == tok.encode(text, add_bos=True)
    # saving over an existing directory replaces files in place
    loaded.save(out)
    assert Tokenizer.from_dir(out).encode(TRICKY[3]) == tok.encode(TRICKY[3])


def test_chat_template_jinja_file_wins_and_stays_in_sync(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!", encoding="utf-8")
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"
    loaded.chat_template = "{{ messages | length }}"
    loaded.save(tmp_path)  # must not leave the stale .jinja overriding the new template
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "a"}]) == "1"


# --- transformers interoperability ------------------------------------------------------------------

def test_transformers_loads_our_directory(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in TRICKY[1:]:
        ours = tok.encode(text)
        assert hf(text)["input_ids"] == ours
        assert fast(text)["input_ids"] == ours
        assert hf.decode(ours) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(msgs)


def test_we_load_transformers_directory(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    template = ("{% for m in messages %}{{ '[' + m['role'] | upper + '] ' + m['content'] + eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<|bos|>",
                                              eos_token="<|eos|>", pad_token="<|pad|>", chat_template=template)
    hf.save_pretrained(str(tmp_path))
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.chat_template == template
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2)
    for text in TRICKY[1:]:
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    msgs = [{"role": "user", "content": "héllo 🙂"}, {"role": "assistant", "content": "hi"}]
    for gen in (True, False):
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == \
            hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    # and back: our re-save of a transformers directory is still readable by transformers
    ours.save(tmp_path / "resaved")
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "resaved"))
    assert again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(msgs)
    assert again(TRICKY[5])["input_ids"] == ours.encode(TRICKY[5])
    # transformers' "unlimited" model_max_length (1e30) means unknown
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = int(1e30)
    _write_config(tmp_path, **cfg)
    assert Tokenizer.from_dir(tmp_path).model_max_length is None


# --- chat templates ---------------------------------------------------------------------------------

def test_list_form_template_and_dict_bos(tok, tmp_path):
    tok.save(tmp_path)
    _write_config(
        tmp_path,
        bos_token={"__type": "AddedToken", "content": "<|bos|>", "lstrip": False, "normalized": True},
        eos_token="<|eos|>",
        chat_template=[{"name": "tool_use", "template": "TOOLS"},
                       {"name": "default", "template": "{{ bos_token }}{% for m in messages %}"
                                                       "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}],
        add_bos_token=True,
    )
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.bos_token == "<|bos|>" and loaded.bos_id == 0 and loaded.pad_token is None
    out = loaded.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert out == "<|bos|>user: a\nassistant: b\n"
    # keys we do not own survive a save
    loaded.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_default_template_and_template_errors(tok):
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == "<|bos|><|user|>\nHi<|eos|>\n<|assistant|>\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<|bos|><|user|>\nHi<|eos|>\n"
    jinja2 = pytest.importorskip("jinja2")
    with pytest.raises(jinja2.TemplateError, match="unsupported chat role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    bare = Tokenizer(tok.backend, bos_token="<|bos|>")
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(msgs)
    # the environment is sandboxed and immutable: templates cannot mutate their inputs
    bare.chat_template = "{{ messages.append(1) }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        bare.apply_chat_template(msgs)


# --- errors -----------------------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*tokenizer.json"):
        load_tokenizer(missing)


def test_missing_tokenizer_json(tmp_path):
    _write_config(tmp_path, bos_token="<s>")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_tokenizer_config(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<|bos|>",', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json.*JSON object"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_unknown_special_token_names_config(tok, tmp_path):
    tok.save(tmp_path)
    _write_config(tmp_path, eos_token="</s>")
    with pytest.raises(ValueError, match=r"tokenizer_config.json.*eos_token '</s>'"):
        Tokenizer.from_dir(tmp_path)
