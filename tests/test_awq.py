"""AWQ (deepmoe/quant/awq.py): exact folds, searches never worse than rounding on their own objective, a
smaller quantisation error than rounding on a model with outlier channels, experts without calibration tokens,
calibration windows and `deepmoe quantize --awq` end to end."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from deepmoe import build_model, load_pretrained, save_pretrained
from deepmoe.cli import main
from deepmoe.quant import QuantError, QuantScheme, quantize_model
from deepmoe.quant.awq import Term, apply_awq, search_clip, search_scale
from deepmoe.quant.calibration import windows
from deepmoe.quant.scheme import fake_quantize
from deepmoe.tokenizer import train_bpe

from .conftest import v2_config, v3_config

SCHEME = QuantScheme("int4", 32)


def outlier_model(cfg, seed=0):
    """A random model whose norms give a few channels 8x the others, as trained models' activations have
    (uniform random activations leave AWQ nothing to find)."""
    model = build_model(cfg, seed=seed).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:4] *= 8
    return model


def ids(n, T=48, seed=0):
    return torch.randint(0, 512, (n, T), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


@pytest.mark.parametrize("cfg", [v3_config, v2_config], ids=["v3-q_lora", "v2-q_proj"])
def test_folded_scales_leave_the_unquantised_model_unchanged(cfg):
    model = outlier_model(cfg())
    x = ids(2, seed=5)
    with torch.no_grad():
        before = model(x)
    folded = copy.deepcopy(model)
    report = apply_awq(folded, ids(4), SCHEME)
    with torch.no_grad():
        after = folded(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    n_moe = sum(1 for i in range(cfg().num_hidden_layers) if cfg().is_moe_layer(i))
    # per layer: attention (q_a or q with kv_a, [q_b], kv_b, o_proj) + MLP (gate/up, down) or MoE (gate/up,
    # shared down, one down per routed expert that got tokens)
    attn = 4 if cfg().q_lora_rank else 3
    experts = cfg().n_routed_experts
    expected = cfg().num_hidden_layers * attn + (cfg().num_hidden_layers - n_moe) * 2 \
        + n_moe * (2 + experts) - report.experts_without_tokens
    assert report.groups == expected and report.layers == cfg().num_hidden_layers
    assert report.error_awq <= report.error_rtn
    # the scales really moved weight between the norm and the projections (else the test proves nothing)
    assert not torch.allclose(folded.model.layers[1].post_attention_layernorm.weight,
                              model.model.layers[1].post_attention_layernorm.weight)
    assert any(a > 0 for a in report.alphas)


def test_search_scale_is_never_worse_than_rounding_and_wins_on_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g)
    x[:, :3] *= 20  # outlier input channels
    w = torch.randn(64, 128, generator=g) * 0.05
    s, alpha, rtn, err = search_scale([Term(x, w)], x.abs().mean(0), SCHEME)
    assert err <= rtn and alpha > 0 and err < 0.7 * rtn
    # what it scores is what a quantised layer computes: Q(w·s) applied to x / s
    w_hat = fake_quantize(w * s, SCHEME)
    direct = float((((x / s) @ w_hat.T - x @ w.T).pow(2).sum() / (x @ w.T).pow(2).sum()))
    assert direct == pytest.approx(err, rel=1e-4)
    # with flat activations there is nothing to gain: α = 0 (plain rounding) is a candidate and may win
    xf = torch.randn(512, 128, generator=g)
    *_, rtn_f, err_f = search_scale([Term(xf, w)], xf.abs().mean(0), SCHEME)
    assert err_f <= rtn_f


def test_search_clip_lowers_the_output_error_of_a_single_group():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g)  # one group per row: the per-group objective is the whole error
    w = torch.randn(16, 32, generator=g) * 0.02
    w[:, 5] = 0.2  # one large weight per row sets a coarse grid for the rest
    clipped = search_clip(x, w, SCHEME)
    assert clipped.shape == w.shape
    assert (clipped.abs() <= w.abs() + 1e-7).all()  # clamping only shrinks

    def err(m):
        return float((x @ (w - fake_quantize(m, SCHEME)).T).pow(2).sum())

    assert err(clipped) < 0.95 * err(w)  # measured 0.92
    assert not torch.equal(clipped, w)


def test_awq_quantised_model_is_closer_to_full_precision_than_rounding():
    model = outlier_model(v3_config(), seed=0)
    x = ids(4, seed=9)
    with torch.no_grad():
        ref = model(x)
    rtn = copy.deepcopy(model)
    quantize_model(rtn, SCHEME)
    awq = copy.deepcopy(model)
    apply_awq(awq, ids(8), SCHEME)
    quantize_model(awq, SCHEME)
    with torch.no_grad():
        e_rtn, e_awq = rel_err(rtn(x), ref), rel_err(awq(x), ref)
    assert e_awq < 0.85 * e_rtn, (e_awq, e_rtn)


def test_experts_without_calibration_tokens_keep_plain_rounding():
    cfg = v3_config()
    model = outlier_model(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias[0] = -100.0  # expert 0 never selected
    before = [layer.mlp.experts.down_proj[0].clone() for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    report = apply_awq(model, ids(4), SCHEME)
    after = [layer.mlp.experts.down_proj[0] for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    assert report.experts_without_tokens == len(before)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # no scale searched, so none folded


def test_skipped_projections_are_not_searched():
    cfg = v3_config()
    full = apply_awq(outlier_model(cfg), ids(4), SCHEME)
    part = apply_awq(outlier_model(cfg), ids(4), SCHEME, skip=[r"o_proj"])
    assert part.groups == full.groups - cfg.num_hidden_layers


def test_calibration_windows_are_spread_and_refuse_too_little_text():
    stream = np.arange(1000)
    w = windows(stream, 4, 100, "x")
    assert w.shape == (4, 100) and w[0, 0] == 0 and w[-1, -1] == 999
    assert (w[:, 1:] - w[:, :-1] == 1).all()
    with pytest.raises(QuantError, match="has 1,000 tokens; 20 samples of 100 tokens need 2,000"):
        windows(stream, 20, 100, "x")


def test_awq_refuses_fp8():
    with pytest.raises(QuantError, match="int8/int4"):
        apply_awq(build_model(v3_config(), seed=0), ids(1), QuantScheme("fp8"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = outlier_model(v3_config())
    path = tmp_path_factory.mktemp("fp32")
    save_pretrained(model, path, dtype=torch.float32)
    text = "def f(x):\n    return x + 1\n" * 20
    train_bpe([text], 300).save(path)
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text("".join(f"def g{i}(a, b):\n    return a * {i} + b\n" for i in range(200)))
    return model, path, calib


def test_cli_quantize_awq_end_to_end(saved, tmp_path, capsys):
    model, path, calib = saved
    out = tmp_path / "awq"
    assert main(["quantize", str(path), str(out), "--scheme", "int4", "--group-size", "32", "--awq",
                 "--calib-data", str(calib), "--calib-samples", "4", "--calib-seq-len", "32", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "4 windows of 32 tokens" in text and "scale searches" in text and "0.266x bf16" not in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left behind
    q = load_pretrained(out, dtype=torch.float32)
    x = ids(2, seed=3)
    with torch.no_grad():
        ref = model(x)
        got = q(x)
    rtn = copy.deepcopy(model)
    quantize_model(rtn, SCHEME)
    with torch.no_grad():
        e_rtn = rel_err(rtn(x), ref)
    assert rel_err(got, ref) < e_rtn  # the file is AWQ's: closer to full precision than rounding
    # side files travel with it, and the folded norms are what it stores
    assert (out / "tokenizer.json").is_file()
    assert not torch.allclose(q.model.layers[1].post_attention_layernorm.weight,
                              model.model.layers[1].post_attention_layernorm.weight)


def test_cli_quantize_awq_bad_requests(saved, tmp_path, capsys):
    _, path, calib = saved
    base = ["quantize", str(path), str(tmp_path / "q")]
    assert main(base + ["--scheme", "int4", "--group-size", "32", "--awq", "--calib-data", str(calib),
                        "--calib-samples", "500", "--calib-seq-len", "256"]) == 2
    assert "calibration data" in capsys.readouterr().err
    assert main(base + ["--scheme", "fp8", "--awq", "--calib-data", str(calib)]) == 2
    assert "--awq applies to int8/int4" in capsys.readouterr().err
    assert main(base + ["--scheme", "int4", "--clip"]) == 2
    assert "apply to --awq only" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    # an already-quantised model is refused before any calibration text is read
    assert main(["quantize", str(path), str(tmp_path / "int8"), "--scheme", "int8", "--group-size", "32"]) == 0
    assert main(["quantize", str(tmp_path / "int8"), str(tmp_path / "again"), "--scheme", "int4", "--awq",
                 "--calib-data", str(tmp_path / "missing.txt")]) == 2
    assert "already quantised" in capsys.readouterr().err
