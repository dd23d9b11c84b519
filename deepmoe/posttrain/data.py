"""Supervised fine-tuning data: JSONL records → token ids with a loss mask → padded batches.

Two record formats, one per JSONL line:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   a chat
    {"prompt": "...", "completion": "..."}                                          plain continuation
A chat is rendered with the tokenizer's chat template, and only the assistant turns are trained on: each
assistant span is found by rendering the conversation up to the turn (with the generation prompt) and
through it, so the model learns exactly the tokens it will be asked to produce after the prompt the
server renders. Spans are tokenized separately, prompt then reply, which is also how generation sees
them (the prompt is encoded, the reply sampled token by token). A prompt/completion pair is
encode(prompt) + encode(completion) + eos, trained on the completion and eos; no bos, as in pretraining
and as `LLM.generate(text)` encodes.

Batches are padded, not packed: each example is one row starting at position 0, padded on the right to
the longest row of its batch. Causal attention never lets a real token see a later pad, so no mask is
needed and the model code is the unmodified pretraining forward; pads carry no loss and are left out of
the expert-load counts and the balance loss. The cost is the pad tokens' compute (reported per step as
pad_fraction); packing several examples into one row would need block-diagonal masks and per-example
positions inside attention.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
BAD_LINE_POLICIES = ("stop", "skip")


class DataError(ValueError):
    pass


# ---- records --------------------------------------------------------------------------------------
def check_record(obj) -> dict:
    """A validated record, or DataError saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError("'messages' must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise DataError(f"message {i} must be an object with a string 'content'")
            if m.get("role") not in ROLES:
                raise DataError(f"message {i} has unknown role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("the conversation has no assistant turn, so nothing in it would be trained on")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if "prompt" in obj or "completion" in obj:
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
            raise DataError("a prompt/completion record needs string 'prompt' and 'completion' fields")
        if not obj["completion"]:
            raise DataError("the completion is empty, so nothing in it would be trained on")
        return {"prompt": obj["prompt"], "completion": obj["completion"]}
    raise DataError(f"expected a 'messages' list or 'prompt' and 'completion' fields, got keys {sorted(obj)}")


@dataclass
class Record:
    data: dict
    where: str  # "file:line", for messages about this record


def read_jsonl(path: str | Path, on_bad_line: str = "stop") -> tuple[list[Record], list[str]]:
    """The valid records of a JSONL file and one message per skipped line. on_bad_line="stop" raises at
    the first bad line instead."""
    if on_bad_line not in BAD_LINE_POLICIES:
        raise ValueError(f"on_bad_line must be one of {', '.join(BAD_LINE_POLICIES)}, got {on_bad_line!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    records, skipped = [], []
    with open(path, "rb") as f:  # bytes, so a line that is not UTF-8 is reported as that line
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                records.append(Record(check_record(json.loads(raw.decode("utf-8"))), where))
            except (UnicodeDecodeError, json.JSONDecodeError, DataError) as e:
                kind = "not UTF-8: " if isinstance(e, UnicodeDecodeError) else \
                    "malformed JSON: " if isinstance(e, json.JSONDecodeError) else ""
                msg = f"{where}: {kind}{e}"
                if on_bad_line == "stop":
                    raise DataError(f"{msg} (pass --on-bad-line skip to skip bad lines)") from None
                skipped.append(msg)
    if not records:
        raise DataError(f"{path} holds no usable record" + (f" ({len(skipped)} bad lines)" if skipped else ""))
    return records, skipped


# ---- rendering and tokenization -------------------------------------------------------------------
def ensure_chat_template(tokenizer: Tokenizer) -> bool:
    """Give a tokenizer without a chat template deepmoe's default (saved with the fine-tuned model, so
    serving renders prompts the way training did). True when it was missing."""
    if tokenizer.chat_template is not None:
        return False
    if tokenizer.bos_token is None or tokenizer.eos_token is None:
        raise DataError("the tokenizer has neither a chat template nor bos/eos tokens for deepmoe's default one; "
                        "add a chat_template to its tokenizer_config.json")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def chat_segments(tokenizer: Tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_reply) pieces up to the end of the last reply."""
    render = tokenizer.apply_chat_template
    full = render(messages, add_generation_prompt=False)
    segments, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        through = render(messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= pos):
            raise DataError("the chat template renders earlier turns differently once later turns follow (some "
                            "templates drop the reasoning of past replies), so assistant spans cannot be located; "
                            "split multi-turn conversations into one record per assistant reply")
        segments += [(full[pos:len(before)], False), (full[len(before):len(through)], True)]
        pos = len(through)
    return segments


def encode_record(tokenizer: Tokenizer, data: dict) -> tuple[list[int], list[bool]]:
    """Token ids of a checked record and, per token, whether it is a training target."""
    eos = tokenizer.eos_id
    if "messages" not in data:
        if eos is None:
            raise DataError("prompt/completion training appends eos, and the tokenizer has no eos_token")
        p, c = tokenizer.encode(data["prompt"]), tokenizer.encode(data["completion"]) + [eos]
        return p + c, [False] * len(p) + [True] * len(c)
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_reply in chat_segments(tokenizer, data["messages"]):
        seg = tokenizer.encode(text)
        target = [is_reply] * len(seg)
        if is_reply and eos in seg:  # what a template writes after the reply's eos is never generated
            cut = seg.index(eos) + 1
            target = [True] * cut + [False] * (len(seg) - cut)
        ids += seg
        mask += target
    return ids, mask


# ---- datasets -------------------------------------------------------------------------------------
@dataclass
class Batch:
    x: torch.Tensor  # (B, T) int64 inputs, right-padded
    y: torch.Tensor  # (B, T) int64 next tokens
    target: torch.Tensor  # (B, T) bool: y is trained on
    valid: torch.Tensor  # (B, T) bool: x is one of the example's inputs (not padding, not its last token)

    def to(self, device) -> Batch:
        return Batch(self.x.to(device), self.y.to(device), self.target.to(device), self.valid.to(device))


@dataclass
class SFTDataset:
    """Tokenized examples in one flat array; example i is tokens[offsets[i]:offsets[i+1]]."""
    tokens: np.ndarray  # (N,) int64
    targets: np.ndarray  # (N,) bool
    offsets: np.ndarray  # (n + 1,) int64
    pad_id: int

    @classmethod
    def from_examples(cls, examples: list[tuple[list[int], list[bool]]], pad_id: int) -> SFTDataset:
        lengths = [len(ids) for ids, _ in examples]
        tokens = np.fromiter((t for ids, _ in examples for t in ids), dtype=np.int64, count=sum(lengths))
        targets = np.fromiter((t for _, m in examples for t in m), dtype=bool, count=sum(lengths))
        return cls(tokens, targets, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), pad_id)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.targets[a:b]

    def num_targets(self) -> int:
        """Trained-on tokens over the whole set (the first token of an example is never a target)."""
        return int(self.targets.sum() - self.targets[self.offsets[:-1]].sum())

    def batch(self, indices) -> Batch:
        rows = [self.example(int(i)) for i in indices]
        T = max(len(ids) for ids, _ in rows) - 1
        x = np.full((len(rows), T + 1), self.pad_id, dtype=np.int64)
        target = np.zeros((len(rows), T + 1), dtype=bool)
        for r, (ids, m) in enumerate(rows):
            x[r, :len(ids)], target[r, :len(ids)] = ids, m
        lengths = np.array([len(ids) for ids, _ in rows])
        valid = np.arange(T)[None, :] < (lengths[:, None] - 1)
        return Batch(torch.from_numpy(x[:, :-1].copy()), torch.from_numpy(x[:, 1:].copy()),
                     torch.from_numpy(target[:, 1:].copy()), torch.from_numpy(valid))


@dataclass
class SFTData:
    tokenizer: Tokenizer
    train: SFTDataset
    val: SFTDataset | None
    notes: list[str] = field(default_factory=list)  # what was skipped, truncated or assumed, for the log


def tokenize_records(tokenizer: Tokenizer, records: list[Record], seq_len: int, notes: list[str],
                     what: str) -> list[tuple[list[int], list[bool]]]:
    """Encode records, cutting each at seq_len + 1 tokens (seq_len inputs and their next tokens). Cuts and
    records left with nothing to train on are counted in `notes`."""
    out, truncated, emptied = [], 0, []
    for rec in records:
        ids, mask = encode_record(tokenizer, rec.data)
        if len(ids) > seq_len + 1:
            truncated += 1
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        if not any(mask[1:]):
            emptied.append(rec.where)
            continue
        out.append((ids, mask))
    if truncated:
        notes.append(f"{what}: {truncated} of {len(records)} examples are longer than seq_len {seq_len} + 1 tokens "
                     "and were truncated (raise --seq-len to keep them whole)")
    if emptied:
        notes.append(f"{what}: {len(emptied)} examples dropped: nothing to train on within seq_len {seq_len} "
                     f"(first: {emptied[0]})")
    if not out:
        raise DataError(f"{what}: no example has a trained-on token within seq_len {seq_len}")
    return out


def held_out_record(data: dict, fraction: float) -> bool:
    """Whether a record goes to validation: a hash of its content, so the split is the same everywhere."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def task_records(task, n_train: int, n_val: int, seed: int) -> tuple[list[Record], list[Record]]:
    """Chat records [user: question, assistant: worked solution] for task problems: n_train from its
    train split, n_val from its held-out split."""
    def records(split, n):
        return [Record({"messages": p.messages() + [{"role": "assistant", "content": p.solution}]},
                       f"{task.name} {split} problem {i}") for i, p in enumerate(task.problems(split, n, seed))]
    return records("train", n_train), records("test", n_val) if n_val else []


def load_records(*, data: str | None = None, task=None, task_examples: int = 0, val_examples: int = 0,
                 val_fraction: float = 0.0, seed: int = 0, on_bad_line: str = "stop"
                 ) -> tuple[list[Record], list[Record], list[str]]:
    """(train records, validation records, notes) from a JSONL file (validation: a content-hashed
    val_fraction of it) or from a task (validation: val_examples of its held-out problems)."""
    if (data is None) == (task is None):
        raise ValueError("give either a data file or a task")
    if task is not None:
        return (*task_records(task, task_examples, val_examples, seed), [])
    notes = []
    records, skipped = read_jsonl(data, on_bad_line)
    if skipped:
        shown = "\n  ".join(skipped[:10]) + (f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        notes.append(f"{data}: skipped {len(skipped)} bad lines:\n  {shown}")
    val = [r for r in records if held_out_record(r.data, val_fraction)] if val_fraction else []
    train = [r for r in records if not val or not held_out_record(r.data, val_fraction)]
    if not train:
        raise DataError(f"{data}: every record fell into the validation split; lower --val-fraction")
    return train, val, notes


def build_sft_data(tokenizer: Tokenizer, seq_len: int, train_records: list[Record], val_records: list[Record],
                   notes: list[str] | None = None) -> SFTData:
    """Tokenized, seq_len-bounded training and validation sets (validation None when it has no record)."""
    notes = list(notes or [])
    if ensure_chat_template(tokenizer):
        notes.append("the tokenizer has no chat template: using deepmoe's default, saved with the model")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an eos token to pad batches with")
    train = SFTDataset.from_examples(tokenize_records(tokenizer, train_records, seq_len, notes, "train"), pad)
    val = (SFTDataset.from_examples(tokenize_records(tokenizer, val_records, seq_len, notes, "validation"), pad)
           if val_records else None)
    return SFTData(tokenizer, train, val, notes)
