"""Weight-only int8 / int4 / fp8 quantisation: schemes (scheme.py), quantised modules (modules.py) and their
CPU kernels (cpu.py), the compressed-tensors and FP8 block formats (format.py), `deepmoe quantize`
(quantize.py, cli.py), and quantisation-aware training's fake quantisation (qat.py).
Names are imported on first use, so the command line's parser imports no torch through here."""

from importlib import import_module

_WHERE = {"apply_qat": "qat", "read_scheme": "format", "QuantExperts": "modules", "QuantLinear": "modules", "prepare_cpu": "modules",
          "use_reference": "modules", "use_kernel": "modules", "quantize_checkpoint": "quantize", "quantize_model": "quantize",
          "QuantError": "scheme", "QuantScheme": "scheme", "dequantize_groups": "scheme", "pack_int4": "scheme",
          "quantize_groups": "scheme", "unpack_int4": "scheme"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
