"""Data layer: corpus discovery and reading, the train/val split, packing into (x, y), resumable sampling, caches."""

import builtins
import json

import numpy as np
import pytest
import torch

from deepmoe.data import (BatchSampler, Document, PackedDataset, cached_token_stream, corpus_fingerprint,
                          load_or_train_tokenizer, read_documents, split_documents, stdlib_documents,
                          tokenize_documents, tokenizer_fingerprint)
from deepmoe.data import corpus as corpus_mod
from deepmoe.data import packing as packing_mod
from deepmoe.tokenizer import train_bpe

VOCAB = 300
TEXTS = [f"def f{i}(x):\n    return x + {i}  # note {i % 7}\n" * 3 for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, VOCAB)


# --- corpus -----------------------------------------------------------------------------------------------

def test_stdlib_documents():
    paths = stdlib_documents()
    assert len(paths) > 100
    assert paths == sorted(paths)
    posix = [p.as_posix() for p in paths]
    assert any(p.endswith("json/__init__.py") for p in posix)
    root = corpus_mod.stdlib_root()
    for p in paths:
        parts = p.relative_to(root).parts
        assert not {"site-packages", "test", "tests", "idlelib", "lib2to3"} & set(parts), p
        assert p.suffix == ".py"


def test_stdlib_read_documents_names_are_relative():
    docs = read_documents(None)
    names = [d.name for d in docs]
    assert "json/__init__.py" in names
    doc = docs[names.index("json/__init__.py")]
    assert "JSONDecoder" in doc.read()
    assert doc.size > 0


def test_split_deterministic_disjoint_covering():
    docs = [Document.from_text(f"doc{i}.txt", "x") for i in range(200)]
    train, val = split_documents(docs, val_fraction=0.1, seed=3)
    again = split_documents(docs, val_fraction=0.1, seed=3)
    assert (train, val) == again
    names_t, names_v = {d.name for d in train}, {d.name for d in val}
    assert not names_t & names_v
    assert names_t | names_v == {d.name for d in docs}
    assert 5 <= len(val) <= 40  # ~20 expected
    # another seed gives another split; order within a side follows the input
    assert split_documents(docs, 0.1, seed=4)[1] != val
    assert [d.name for d in train] == [d.name for d in docs if d.name in names_t]
    # adding documents never moves an existing one across the split
    more = docs + [Document.from_text(f"extra{i}.txt", "x") for i in range(50)]
    assert names_v <= {d.name for d in split_documents(more, 0.1, seed=3)[1]}


def test_split_never_empty_val():
    for n in (2, 3, 5):
        docs = [Document.from_text(f"d{i}", "x") for i in range(n)]
        train, val = split_documents(docs, val_fraction=0.05)
        assert len(val) >= 1 and len(train) >= 1 and len(train) + len(val) == n
    assert split_documents([Document.from_text("only", "x")], 0.05)[1] == []
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents([], val_fraction=1.0)


def test_split_of_paths_uses_stdlib_relative_names():
    paths = stdlib_documents()
    docs = read_documents(None)
    split_p = split_documents(paths)
    split_d = split_documents(docs)
    rel = [p.relative_to(corpus_mod.stdlib_root()).as_posix() for p in split_p[1]]
    assert rel == [d.name for d in split_d[1]]


def test_read_text_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("héllo\nwörld \xff".encode("utf-8") + b"\xff\xfe")  # invalid UTF-8 is replaced, not fatal
    (doc,) = read_documents(str(f))
    assert doc.name == "a.txt"
    assert doc.read().startswith("héllo\nwörld")
    assert "\ufffd" in doc.read()


def test_read_folder_skips_binary_and_hidden(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# title\n")
    (tmp_path / "sub" / "b.py").write_text("print(1)\n")
    (tmp_path / "sub" / "c.json").write_text('{"k": 1}\n')
    (tmp_path / "blob.bin").write_bytes(b"ab\x00cd" * 100)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("secret")
    docs = read_documents(tmp_path)
    assert [d.name for d in docs] == ["a.md", "sub/b.py", "sub/c.json"]
    assert docs[1].read() == "print(1)\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no text files"):
        read_documents(empty)


def test_read_jsonl(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"body": "two", "text": "three"}) + "\n")
    docs = read_documents(f)
    assert [d.read() for d in docs] == ["one", "three"]
    assert [d.name for d in docs] == ["c.jsonl:1", "c.jsonl:3"]
    with pytest.raises(ValueError, match=r"line 1 has no field 'body'"):
        read_documents(f, text_field="body")


def test_read_jsonl_malformed_line_names_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl' line 3 is not valid JSON"):
        read_documents(f)
    f.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match="must be a string"):
        read_documents(f)


def test_read_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_documents(str(missing))


def test_read_parquet_or_clear_error(tmp_path, monkeypatch):
    f = tmp_path / "d.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        f.write_bytes(b"PAR1\x00")
    else:
        pq.write_table(pa.table({"text": ["a", "b"], "n": [1, 2]}), f)
        assert [d.read() for d in read_documents(f)] == ["a", "b"]
        with pytest.raises(ValueError, match="no column 'body'"):
            read_documents(f, text_field="body")

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        read_documents(f)


def test_corpus_fingerprint_tracks_names_and_sizes():
    a = [Document.from_text("x", "abc"), Document.from_text("y", "de")]
    assert corpus_fingerprint(a) == corpus_fingerprint(list(a))
    assert corpus_fingerprint(a) != corpus_fingerprint([a[0], Document.from_text("y", "def")])
    assert corpus_fingerprint(a) != corpus_fingerprint([a[0], Document.from_text("z", "de")])


# --- packing ----------------------------------------------------------------------------------------------

def test_tokenize_documents_eos_separators(tok):
    texts = ["def f(x):", "return x", ""]
    stream = tokenize_documents(tok, texts)
    assert stream.ndim == 1 and stream.dtype == np.uint32
    expected = []
    for t in texts:
        expected += tok.encode(t) + [tok.eos_id]
    assert stream.tolist() == expected
    assert (stream == tok.eos_id).sum() == 3
    assert tok.decode(stream[: stream.tolist().index(tok.eos_id)]) == "def f(x):"
    assert tokenize_documents(tok, []).shape == (0,)


def test_packed_dataset_shift_and_count():
    stream = np.arange(103, dtype=np.uint32)
    ds = PackedDataset(stream, seq_len=10)
    assert ds.num_sequences == len(ds) == 10  # (103 - 1) // 10
    x, y = ds.batch([0, 9, 3])
    assert x.shape == y.shape == (3, 10) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x[0].tolist() == list(range(10)) and y[0].tolist() == list(range(1, 11))
    assert x[1].tolist() == list(range(90, 100)) and y[1, -1].item() == 100
    # input windows tile the stream: every token but the last is an input exactly once
    xs, _ = ds.batch(list(range(ds.num_sequences)))
    assert xs.flatten().tolist() == list(range(100))
    with pytest.raises(IndexError):
        ds.batch([10])
    with pytest.raises(ValueError, match="too few"):
        PackedDataset(np.arange(10, dtype=np.uint32), seq_len=10)


def test_packed_dataset_over_real_tokens(tok):
    stream = tokenize_documents(tok, TEXTS)
    ds = PackedDataset(stream, seq_len=16)
    assert ds.num_sequences == (len(stream) - 1) // 16
    x, y = ds.batch([1])
    assert x[0].tolist() == stream[16:32].tolist() and y[0].tolist() == stream[17:33].tolist()


def test_sampler_epochs_cover_all():
    s = BatchSampler(num_sequences=10, batch_size=3, seed=1)
    epoch0 = [next(s) for _ in range(3)]
    flat = sum(epoch0, [])
    assert len(set(flat)) == 9 and all(0 <= i < 10 for i in flat)  # remainder of 1 dropped
    epoch1 = [next(s) for _ in range(3)]
    assert s.epoch == 1 and epoch1 != epoch0
    assert [next(BatchSampler(10, 3, seed=1)) for _ in range(1)] == epoch0[:1]  # deterministic from the seed
    with pytest.raises(ValueError, match="fewer than batch_size"):
        BatchSampler(num_sequences=2, batch_size=3)


def test_sampler_resume():
    s = BatchSampler(num_sequences=20, batch_size=4, seed=7)  # 5 steps per epoch: resume crosses an epoch
    _ = [next(s) for _ in range(3)]
    state = json.loads(json.dumps(s.state_dict()))  # must survive a JSON/checkpoint round trip
    expected = [next(s) for _ in range(3)]
    resumed = BatchSampler(num_sequences=20, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(3)] == expected
    with pytest.raises(ValueError, match="batch_size=4"):
        BatchSampler(num_sequences=20, batch_size=5, seed=7).load_state_dict(state)


def test_tokenizer_cache(tmp_path, monkeypatch):
    calls = []

    def texts():
        calls.append(1)
        return iter(TEXTS)

    first = load_or_train_tokenizer(tmp_path / "cache", texts, VOCAB, corpus_fingerprint="aaaa" * 16)
    assert len(calls) == 1 and first.vocab_size == VOCAB

    def fail(*a, **k):
        raise AssertionError("train_bpe must not run on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(packing_mod, "train_bpe", fail)
        second = load_or_train_tokenizer(tmp_path / "cache", texts, VOCAB, corpus_fingerprint="aaaa" * 16)
    assert len(calls) == 1
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)
    assert second.encode("def f(x):") == first.encode("def f(x):")

    load_or_train_tokenizer(tmp_path / "cache", texts, VOCAB, corpus_fingerprint="bbbb" * 16)
    assert len(calls) == 2  # another corpus retrains
    load_or_train_tokenizer(tmp_path / "cache", texts, VOCAB + 20, corpus_fingerprint="aaaa" * 16)
    assert len(calls) == 3  # another vocab size retrains
    # no temp directories are left behind
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_cached_token_stream(tmp_path, tok):
    calls = []

    def make():
        calls.append(1)
        return tokenize_documents(tok, TEXTS)

    fp = tokenizer_fingerprint(tok)
    a = cached_token_stream(tmp_path, "train-abc", fp, make)
    b = cached_token_stream(tmp_path, "train-abc", fp, make)
    assert len(calls) == 1
    assert np.array_equal(a, b) and a.dtype == np.uint32
    assert np.array_equal(np.asarray(a), tokenize_documents(tok, TEXTS))
    cached_token_stream(tmp_path, "train-abc", "0" * 64, make)
    assert len(calls) == 2  # another tokenizer retokenizes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"train-abc-{fp[:16]}.npy", f"train-abc-{'0' * 16}.npy"])
    with pytest.raises(ValueError, match="plain file name"):
        cached_token_stream(tmp_path, "a/b", fp, make)
    with pytest.raises(TypeError, match="tokenize_documents"):
        cached_token_stream(tmp_path, "other", fp, lambda: TEXTS)
