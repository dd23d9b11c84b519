"""SFT data: which tokens are trained on, how records are checked and reported, truncation, padding."""

import json

import pytest
import torch

from deepmoe.posttrain.data import (DataError, Record, SFTDataset, build_sft_data, chat_segments, encode_record,
                                    load_records, read_jsonl)
from deepmoe.tokenizer import DEFAULT_CHAT_TEMPLATE, train_bpe

TEXTS = ["hello there, how are you today?", "the answer is 42 and nothing else", "system says be brief"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, 320)


def decoded_targets(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_only_assistant_replies_and_their_eos_are_targets(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "the answer is 42"}, {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "nothing else"}]
    ids, mask = encode_record(tok, {"messages": messages})
    assert decoded_targets(tok, ids, mask) == "the answer is 42<|eos|>nothing else<|eos|>"
    # the rest is exactly the prompt text the template renders around the replies
    assert tok.decode(ids) == tok.apply_chat_template(messages, add_generation_prompt=False)
    # a reply's first token follows the generation prompt: what the server renders before generating
    first = mask.index(True)
    assert tok.decode(ids[:first]) == tok.apply_chat_template(messages[:2], add_generation_prompt=True)


def test_prompt_completion_is_trained_on_the_completion_and_eos(tok):
    ids, mask = encode_record(tok, {"prompt": "hello there", "completion": " the answer is 42"})
    assert ids == tok.encode("hello there") + tok.encode(" the answer is 42") + [tok.eos_id]
    assert decoded_targets(tok, ids, mask) == " the answer is 42<|eos|>"
    assert mask[:len(tok.encode("hello there"))] == [False] * len(tok.encode("hello there"))


def test_a_template_that_rewrites_history_is_refused(tok):
    # drops every earlier assistant turn once a later one exists: spans cannot be located
    tok2 = train_bpe(TEXTS, 320)
    tok2.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                          "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    one = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert [t for t, _ in chat_segments(tok2, one)] == ["user: hi<|eos|>assistant: ", "yo<|eos|>"]
    with pytest.raises(DataError, match="renders earlier turns differently"):
        chat_segments(tok2, one + one)


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "there"}]}


@pytest.mark.parametrize("line,message", [
    ("{not json", r"data.jsonl:2: malformed JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"data.jsonl:2: the conversation has no assistant turn"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"data.jsonl:2: message 0 has unknown role 'tool'; expected one of system, user, assistant"),
    ({"messages": []}, r"data.jsonl:2: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, r"data.jsonl:2: message 0 must be an object with a string 'content'"),
    ({"prompt": "a"}, r"data.jsonl:2: a prompt/completion record needs string 'prompt' and 'completion'"),
    ({"text": "a"},
     r"data.jsonl:2: expected a 'messages' list or 'prompt' and 'completion' fields, got keys \['text'\]"),
    ([1, 2], r"data.jsonl:2: expected a JSON object, got list"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError, match=message + r".*--on-bad-line skip"):
        read_jsonl(path)
    records, skipped = read_jsonl(path, on_bad_line="skip")
    assert [r.where for r in records] == [f"{path}:1", f"{path}:3"]
    assert len(skipped) == 1 and skipped[0].startswith(f"{path}:2: ")


def test_non_utf8_line_and_empty_files(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: not UTF-8"):
        read_jsonl(path)
    write_lines(path, ["", "{bad"])
    with pytest.raises(DataError, match=r"holds no usable record \(1 bad lines\)"):
        read_jsonl(path, on_bad_line="skip")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_skipped_lines_are_listed_in_the_notes(tmp_path, tok):
    path = write_lines(tmp_path / "data.jsonl", [GOOD] * 5 + ["{bad"] * 12)
    train, val, notes = load_records(data=str(path), on_bad_line="skip")
    assert len(train) == 5 and not val
    assert notes[0].startswith(f"{path}: skipped 12 bad lines:\n  {path}:6: malformed JSON")
    assert notes[0].endswith("... and 2 more")


def test_truncation_is_counted_and_empty_examples_dropped(tok):
    long = Record({"prompt": "hello there " * 30, "completion": "the answer"}, "f:1")
    short = Record({"prompt": "hello", "completion": " there"}, "f:2")
    fits = Record({"prompt": "hello", "completion": " the answer is 42 " * 10}, "f:3")
    data = build_sft_data(tok, 16, [long, short, fits], [])
    assert len(data.train) == 2  # `long` has no completion token within 17 tokens
    assert any("2 of 3 examples are longer than seq_len 16 + 1 tokens and were truncated" in n for n in data.notes)
    assert any("1 examples dropped: nothing to train on within seq_len 16 (first: f:1)" in n for n in data.notes)
    assert max(len(data.train.example(i)[0]) for i in range(2)) == 17
    with pytest.raises(DataError, match="no example has a trained-on token"):
        build_sft_data(tok, 16, [long], [])


def test_a_tokenizer_without_template_gets_the_default(tok):
    bare = train_bpe(TEXTS, 320)
    bare.chat_template = None
    data = build_sft_data(bare, 64, [Record(GOOD, "x")], [])
    assert bare.chat_template == DEFAULT_CHAT_TEMPLATE
    assert any("no chat template" in n for n in data.notes)


def test_padded_batch_marks_targets_and_real_tokens():
    ds = SFTDataset.from_examples([([5, 6, 7, 8], [False, False, True, True]), ([9, 10], [False, True])], pad_id=0)
    assert ds.num_targets() == 3
    b = ds.batch([0, 1])
    assert b.x.tolist() == [[5, 6, 7], [9, 10, 0]]  # an example's last token is no input: it has no next
    assert b.y.tolist() == [[6, 7, 8], [10, 0, 0]]
    assert b.target.tolist() == [[False, True, True], [True, False, False]]
    assert b.valid.tolist() == [[True, True, True], [True, False, False]]
    assert b.x.dtype == torch.int64


def test_file_split_is_by_content(tmp_path):
    lines = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(400)]
    path = write_lines(tmp_path / "data.jsonl", lines)
    train, val, _ = load_records(data=str(path), val_fraction=0.1)
    assert 20 < len(val) < 60 and len(train) + len(val) == 400
    path2 = write_lines(tmp_path / "shuffled.jsonl", lines[::-1])  # order does not matter, content does
    _, val2, _ = load_records(data=str(path2), val_fraction=0.1)
    assert sorted(r.data["prompt"] for r in val) == sorted(r.data["prompt"] for r in val2)
