"""Tokenizer: the map between text and the integer token ids a language model reads and writes.

This is a thin wrapper over a Hugging Face `tokenizers.Tokenizer` that adds what the raw library leaves to
`transformers`: the named special tokens (bos/eos/pad), the jinja chat template that turns a list of
messages into one prompt string, and the on-disk layout (`tokenizer.json` + `tokenizer_config.json`
[+ `chat_template.jinja`]) so directories move freely between this package and `transformers`.
`train_bpe` builds a byte-level BPE tokenizer from scratch for small experiments.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from .durable import atomic_write_text, fsync_dir, mkdir

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# transformers writes int(1e30) for "no limit"; anything that large means unknown, not a real context length.
_NO_MAX_LENGTH = int(1e29)

# Keys this class owns in tokenizer_config.json; everything else is carried through load -> save untouched
# so that e.g. `add_bos_token` of a Hub tokenizer survives a round trip.
_OWNED_KEYS = ("tokenizer_class", "bos_token", "eos_token", "pad_token", "chat_template", "model_max_length")

# Default template installed by `train_bpe`. Role headers are plain text (`<|user|>\n`), not special tokens,
# so they cost a few ids each; every turn ends with eos so generation stops at the end of the reply:
#   <|bos|><|user|>\nHi<|eos|>\n<|assistant|>\n
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special tokens and a chat template.

    `encode` never adds special tokens implicitly (whatever post-processor tokenizer.json carries is
    bypassed); ask for bos with `add_bos=True`. This keeps training data construction explicit.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, model_max_length: int | None = None,
                 extra_config: dict[str, Any] | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.extra_config = dict(extra_config or {})
        for name in ("bos", "eos", "pad"):
            getattr(self, f"{name}_id")  # fail at construction, not at first use, if a token is unknown

    def _special_id(self, name: str) -> int | None:
        token = getattr(self, f"{name}_token")
        if token is None:
            return None
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise ValueError(f"{name}_token {token!r} is not in the tokenizer's vocabulary")
        return idx

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.backend.id_to_token(idx)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no bos_token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # int() accepts numpy/torch scalars, which the Rust binding rejects
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the chat template, as transformers
        does: the template sees `messages`, `add_generation_prompt`, the special tokens, any extra `kwargs`
        and `raise_exception(msg)` (which raises jinja2.TemplateError)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template: set `chat_template` or load a tokenizer "
                             f"directory whose {CONFIG_FILE} or {CHAT_TEMPLATE_FILE} provides one")
        # unset tokens are left undefined (not "None") so templates can test `bos_token is defined`
        specials = {f"{n}_token": t for n in ("bos", "eos", "pad") if (t := getattr(self, f"{n}_token")) is not None}
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **specials, **kwargs)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a Hugging Face tokenizer directory: tokenizer.json (required), tokenizer_config.json and
        chat_template.jinja (optional; the .jinja file wins over the config's template, as in transformers)."""
        root = Path(path)
        expected = f"expected a directory containing {TOKENIZER_FILE} (and optionally {CONFIG_FILE})"
        if not root.exists():
            raise FileNotFoundError(f"tokenizer directory {str(root)!r} does not exist; {expected}")
        if not root.is_dir():
            raise NotADirectoryError(f"tokenizer path {str(root)!r} is not a directory; {expected}")
        tok_file = root / TOKENIZER_FILE
        if not tok_file.is_file():
            raise FileNotFoundError(f"{str(tok_file)!r} not found; {expected}")
        try:
            backend = tokenizers.Tokenizer.from_str(tok_file.read_text(encoding="utf-8"))
        except Exception as e:  # the binding raises a bare Exception for bad JSON or an unknown schema
            raise ValueError(f"{str(tok_file)!r} is not a valid tokenizers JSON file: {e}") from e

        config: dict[str, Any] = {}
        cfg_file = root / CONFIG_FILE
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{str(cfg_file)!r} is not valid JSON: {e}") from e
            if not isinstance(config, dict):
                raise ValueError(f"{str(cfg_file)!r} must hold a JSON object, got {type(config).__name__}")

        template = _pick_template(config.get("chat_template"), cfg_file)
        jinja_file = root / CHAT_TEMPLATE_FILE
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        max_len = config.get("model_max_length")
        if not isinstance(max_len, int) or max_len >= _NO_MAX_LENGTH:
            max_len = None
        try:
            return cls(backend, bos_token=_token_str(config.get("bos_token")),
                       eos_token=_token_str(config.get("eos_token")), pad_token=_token_str(config.get("pad_token")),
                       chat_template=template, model_max_length=max_len,
                       extra_config={k: v for k, v in config.items() if k not in _OWNED_KEYS})
        except ValueError as e:
            raise ValueError(f"{str(cfg_file)!r}: {e}") from e

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into `path` (created if needed), each atomically,
        in the layout `transformers.AutoTokenizer.from_pretrained(path)` reads."""
        root = mkdir(path)
        config: dict[str, Any] = dict(self.extra_config)
        # transformers would otherwise "clean up" spaces before punctuation and break exact round trips
        config.setdefault("clean_up_tokenization_spaces", False)
        config.update(tokenizer_class="PreTrainedTokenizerFast", bos_token=self.bos_token,
                      eos_token=self.eos_token, pad_token=self.pad_token)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        atomic_write_text(root / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        atomic_write_text(root / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        # a leftover chat_template.jinja would override the template just written to the config on load
        if (root / CHAT_TEMPLATE_FILE).exists():
            if self.chat_template is None:
                os.remove(root / CHAT_TEMPLATE_FILE)
                fsync_dir(root)
            else:
                atomic_write_text(root / CHAT_TEMPLATE_FILE, self.chat_template)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Same as `Tokenizer.from_dir(path)`."""
    return Tokenizer.from_dir(path)


def train_bpe(texts: Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = ("<|bos|>", "<|eos|>", "<|pad|>"),
              min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`.

    `special_tokens` are bos, eos and (optionally) pad, in that order, followed by any extra reserved
    tokens; they take ids 0, 1, 2, .... All 256 byte symbols are in the base vocabulary, so any string
    encodes without an unknown token and decode(encode(s)) == s exactly. Installs DEFAULT_CHAT_TEMPLATE.
    """
    special_tokens = list(special_tokens)
    if len(special_tokens) < 2 or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens must be distinct and start with bos and eos, got {special_tokens!r}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet ({len(alphabet)}) plus "
                         f"{len(special_tokens)} special tokens")
    backend = tokenizers.Tokenizer(models.BPE())
    # no normalizer: any normalization would make the round trip lossy
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=special_tokens, initial_alphabet=alphabet)
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, bos_token=special_tokens[0], eos_token=special_tokens[1],
                     pad_token=special_tokens[2] if len(special_tokens) > 2 else None,
                     chat_template=DEFAULT_CHAT_TEMPLATE)


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json stores a special token either as a string or as a serialized AddedToken
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token must be a string or a {{'content': ...}} object, got {value!r}")


def _pick_template(value: Any, source: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # legacy multi-template form: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        logger.warning("%s: chat_template lists %s but no 'default'; no chat template loaded", source, list(named))
        return None
    raise ValueError(f"{str(source)!r}: chat_template must be a string or a list of {{name, template}}, "
                     f"got {type(value).__name__}")


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    # lazy: only chat rendering needs jinja2; mirrors transformers' environment so Hub templates behave alike
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # transformers' `{% generation %}` marks assistant spans for loss masks; here it renders its body as is
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes, which would corrupt prompts
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
