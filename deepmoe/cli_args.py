"""Argument conventions every `deepmoe` subcommand follows (tests/test_cli.py checks them for all).

- Subparsers are `Parser`s (add_subparsers passes the class on), so they get `HelpFormatter`: every
  option's help ends with "(default: X)". When the default is None the help itself says what happens then
  ("default: cuda if available"); choices are given as `choices=`, so `--help` lists them.
- A model directory is named the same way everywhere: `add_model_arg` takes it positionally or as
  `--model DIR`; `resolve_model_arg` leaves it in args.model.
- Arguments are checked while parsing, by the `type=` functions here (`at_least(1)`, `device`,
  `model_dir`, ...): a bad one is one line on stderr and exit code 2, before anything is loaded. Errors
  found later (a bad checkpoint, a ValueError from a config) end the same way in cli.main.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# the spellings --dtype accepts → the name shown in --help's choices
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
CHECKPOINT_DTYPE = "default: the checkpoint's, fp32 for an fp32 checkpoint (a training run's), else bf16"


class Parser(argparse.ArgumentParser):
    """Errors are one line (`deepmoe generate: error: ...`, exit code 2), like those found after parsing."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with "(default: X)", unless it says its default itself; flags say on/off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        positional = not action.option_strings and action.nargs != "?"
        if positional:
            return text
        if action.required:
            return f"{text} (required)"
        if "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if action.nargs == 0 and isinstance(action.default, bool):  # --flag / --no-flag
            return f"{text} (default: {'on' if action.default else 'off'})"
        return text + " (default: %(default)s)"


# ---- argument types: each checks one argument while parsing -------------------------------------------
def at_least(low: int, high: int | None = None):
    """An integer >= low (and <= high)."""
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return check


def non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def device(text: str) -> str:
    """cpu, cuda or cuda:N, and only a CUDA device this torch can use."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise argparse.ArgumentTypeError(f"{text}: this torch ({torch.__version__}) is built without CUDA; "
                                             "install a CUDA build of torch or use --device cpu")
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is visible; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} CUDA devices "
                                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: deepmoe runs on cpu or cuda")
    return text


def model_dir(text: str) -> str:
    """A directory holding config.json (a Hugging Face DeepSeek-V2/V3 directory or a training run's final/)."""
    from .durable import resolve_dir

    path = resolve_dir(Path(text))  # load_pretrained also accepts what an interrupted re-save left behind
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    if not (path / "config.json").is_file():
        hint = f"; did you mean {str(path / 'final')!r}?" if (path / "final" / "config.json").is_file() else ""
        raise argparse.ArgumentTypeError(f"{text!r} holds no config.json, so it is not a model directory{hint}")
    return text


def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return text


def dtype_name(text: str) -> str:
    return DTYPE_ALIASES.get(text, text)  # `choices` then accepts or refuses the canonical name


def torch_dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, DTYPES[name])


def shard_size(text: str) -> int:
    from .convert import parse_size

    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return size


# ---- arguments several subcommands share ---------------------------------------------------------------
def add_model_arg(p: argparse.ArgumentParser, required: bool = True, group=None) -> None:
    """MODEL_DIR positionally or as --model MODEL_DIR (one of the two); `parse_args` puts it in args.model."""
    group = group or p.add_mutually_exclusive_group()
    group.add_argument("model_dir", nargs="?", type=model_dir, metavar="MODEL_DIR",
                       help="a model directory: Hugging Face DeepSeek-V2/V3 or a training run's final/"
                            + ("" if required else " (default: none)"))
    group.add_argument("--model", dest="model_flag", type=model_dir, metavar="MODEL_DIR",
                       help="the same as the positional MODEL_DIR"
                            + (" (default: none)" if not required else " (required: one or the other)"))
    p.set_defaults(model_required=required)


def add_device_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", type=dtype_name, choices=list(DTYPES), default=None,
                   help=f"weights and compute dtype ({CHECKPOINT_DTYPE})")


def resolve_model_arg(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """add_model_arg's two spellings (argparse refuses both at once) → args.model; missing → exit 2."""
    if "model_flag" not in args:
        return
    args.model = args.model_dir or args.model_flag
    if args.model is None and args.model_required:
        parser.exit(2, f"deepmoe {args.command}: error: give the model directory: "
                       f"deepmoe {args.command} MODEL_DIR (or --model MODEL_DIR)\n")


def add_dataclass_flags(p: argparse.ArgumentParser, cls, helps: dict[str, str], choices: dict | None = None,
                        types: dict | None = None, renames: dict[str, str] | None = None) -> None:
    """One flag per field of the config dataclass `cls` that `helps` documents (`--field-name`, or `renames`'
    spelling): booleans as --x/--no-x, tuples as comma-separated values, everything else by the field's type
    unless `types` gives a checking function. Every flag defaults to SUPPRESS, so only the flags given reach the
    config (and a resume's check of what changed); the help shows the dataclass's default instead."""
    import dataclasses
    import typing

    choices, types, renames = choices or {}, types or {}, renames or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in helps:
            continue
        flag = renames.get(f.name, "--" + f.name.replace("_", "-"))
        kind = hints[f.name]
        help = helps[f.name]
        if "default" not in help and "(required)" not in help:
            shown = (("on" if f.default else "off") if kind is bool
                     else ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default)
            help += f" (default: {shown})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help)
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(kind) is tuple:  # comma-separated values
            item = typing.get_args(kind)[0]
            p.add_argument(flag, type=lambda s, item=item: tuple(item(v) for v in s.split(",") if v.strip()),
                           metavar=flag.removeprefix("--").replace("-", "_").upper(), **kw)
        else:
            base = next(t for t in (int, float, str) if t == kind or t in typing.get_args(kind))
            metavar = None if f.name in choices else flag.removeprefix("--").replace("-", "_").upper()
            p.add_argument(flag, type=types.get(f.name, base), choices=choices.get(f.name), metavar=metavar, **kw)
