"""Corpus: the documents a model trains on, found on disk and split into train and validation sets.

A `Document` is a name (its stable identity: a relative path, or `file.jsonl:LINE`), a size and a lazy
text loader, so listing a large corpus costs a directory walk, not reading every file. The default corpus
is the Python standard library of the running interpreter: real code, present everywhere, no download.
The train/val split is by document (never inside one) and decided by a hash of the name, so it is the same
on every machine and run, and adding a document never moves another across the split.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

# Directories of the stdlib that are tests, tools or vendored packages rather than library code.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                               "__pycache__"})
_BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One training document. `read()` returns its text; files are read only when asked."""
    name: str
    size: int  # bytes on disk (or of the UTF-8 text), part of the corpus fingerprint
    load: Callable[[], str] = field(repr=False, compare=False)

    def read(self) -> str:
        return self.load()

    @classmethod
    def from_text(cls, name: str, text: str) -> Document:
        return cls(name, len(text.encode("utf-8", errors="replace")), lambda: text)

    @classmethod
    def from_file(cls, name: str, path: Path) -> Document:
        return cls(name, path.stat().st_size, lambda: _read_text(path))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> list[Path]:
    """All `*.py` files of this interpreter's standard library, minus tests, idlelib, lib2to3 and
    site-packages, sorted so every run sees the same order."""
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {str(root)!r} not found; pass a corpus path instead")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place so os.walk never descends into skipped trees (site-packages can be huge)
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found)


def read_documents(spec: str | os.PathLike | None, text_field: str = "text") -> list[Document]:
    """Documents named by `spec`: None for the standard library, a text file (one document), a folder (every
    text file below it, binary files skipped), a `.jsonl` file (one document per line, text in `text_field`)
    or a `.parquet` file (one document per row, text in column `text_field`)."""
    if spec is None:
        root = stdlib_root()
        return [Document.from_file(p.relative_to(root).as_posix(), p) for p in stdlib_documents()]
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"corpus path {str(path)!r} does not exist; pass a text file, a folder of text "
                                "files, a .jsonl or .parquet file, or nothing for the Python standard library")
    if path.is_dir():
        docs = _folder_documents(path)
        if not docs:
            raise ValueError(f"no text files found under {str(path)!r}")
        return docs
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_documents(path, text_field)
    if suffix == ".parquet":
        return _parquet_documents(path, text_field)
    if _is_binary(path):
        raise ValueError(f"{str(path)!r} looks binary (NUL byte in its first {_BINARY_SNIFF_BYTES} bytes); "
                         "pass a UTF-8 text file, a .jsonl or a .parquet file")
    return [Document.from_file(path.name, path)]


T = TypeVar("T")


def document_name(doc: Document | str | os.PathLike) -> str:
    """The identity a document is split and fingerprinted by: a Document's name; for a path, its path
    relative to the standard library when it lies there (so the split is the same on every machine)."""
    if isinstance(doc, Document):
        return doc.name
    path = Path(doc)
    try:
        return path.relative_to(stdlib_root()).as_posix()
    except ValueError:
        return path.as_posix()


def split_documents(docs: Sequence[T], val_fraction: float = 0.05, seed: int = 0) -> tuple[list[T], list[T]]:
    """Deterministic document-level split: a document is in val when sha256(seed, name) falls below
    `val_fraction`. Train is never empty, and with >= 2 documents neither is val (a lone document trains).
    Input order is kept within each side."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    scores = [_unit_hash(f"{seed}\0{document_name(d)}") for d in docs]
    in_val = [s < val_fraction for s in scores]
    # small corpora can land entirely on one side; move the document nearest the threshold
    if docs and all(in_val):
        in_val[max(range(len(docs)), key=scores.__getitem__)] = False
    if len(docs) >= 2 and not any(in_val):
        in_val[min(range(len(docs)), key=scores.__getitem__)] = True
    train = [d for d, v in zip(docs, in_val) if not v]
    val = [d for d, v in zip(docs, in_val) if v]
    return train, val


def corpus_fingerprint(docs: Sequence[Document]) -> str:
    """A hex digest of the documents' names and sizes: changes when the corpus does, costs no file reads."""
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.name}\0{d.size}\n".encode("utf-8", errors="replace"))
    return h.hexdigest()


def _unit_hash(key: str) -> float:
    # first 8 bytes of sha256 as a number in [0, 1); Python's hash() is salted per process, so unusable here
    digest = hashlib.sha256(key.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _read_text(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_BINARY_SNIFF_BYTES)


def _folder_documents(root: Path) -> list[Document]:
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        # hidden directories (.git, .venv) and caches are tooling, not corpus
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_file() or _is_binary(path):
                continue
            docs.append(Document.from_file(path.relative_to(root).as_posix(), path))
    docs.sort(key=lambda d: d.name)
    return docs


def _jsonl_documents(path: Path, text_field: str) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{str(path)!r} line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON ({e}); each line must be one JSON object") from e
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{where} has no field {text_field!r}; each line must be a JSON object with the "
                                 "text in that field (choose another field with --text-field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
            docs.append(Document.from_text(f"{path.name}:{lineno}", text))
    if not docs:
        raise ValueError(f"{str(path)!r} holds no documents (it is empty)")
    return docs


def _parquet_documents(path: Path, text_field: str) -> list[Document]:
    try:
        import pyarrow.parquet as pq  # optional: only parquet corpora need it
    except ImportError as e:
        raise ImportError(f"reading {str(path)!r} needs pyarrow, which is not installed; "
                          "run `pip install pyarrow` or convert the file to .jsonl") from e
    schema = pq.read_schema(path)
    if text_field not in schema.names:
        raise ValueError(f"{str(path)!r} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
                         "choose the text column with --text-field")
    column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    return [Document.from_text(f"{path.name}:{row}", text) for row, text in enumerate(column)
            if isinstance(text, str)]
