"""FP8 training (train/fp8.py) against an independent definition: quantisation tile by tile, the three GEMMs
of a linear layer (forward, dgrad, wgrad) with the recipe's scales, the model conversion, and a short
training run that stays close to fp32."""

import pytest
import torch
from torch import nn

from deepmoe.config import ModelConfig
from deepmoe.model import build_model
from deepmoe.train.fp8 import Fp8Linear, convert_to_fp8_training, quantize_tiles
from deepmoe.train.fp8_experts import (Fp8Experts, _Fp8GroupedMM, fp8_grouped_mm_reference, quantize_rows,
                                       scaled_grouped_mm)

E4M3 = torch.float8_e4m3fn


def fake_quant(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """x with every rows×cols block replaced by its e4m3 round trip at scale amax/448 (the recipe's
    definition, written independently of the module: an explicit loop over blocks)."""
    out = torch.empty_like(x, dtype=torch.float32)
    for i in range(0, x.shape[0], rows):
        for j in range(0, x.shape[1], cols):
            block = x[i:i + rows, j:j + cols].float()
            scale = block.abs().max().clamp(min=1e-12) / 448.0
            out[i:i + rows, j:j + cols] = (block / scale).to(E4M3).float() * scale
    return out


def test_tiles_scale_each_1x128_run_by_its_own_absmax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g)
    x[2, 130] = 1000.0  # an outlier costs the precision of its own tile only
    q, scale = quantize_tiles(x)
    assert q.dtype == E4M3 and q.shape == (5, 300) and scale.shape == (5, 3)
    assert torch.equal(scale, torch.stack([x[:, i:i + 128].abs().amax(1) for i in (0, 128, 256)], 1) / 448)
    assert float(q.float()[2, 130]) == 448.0  # the tile's absmax lands on e4m3's largest value
    deq = q.float() * scale.repeat_interleave(128, 1)[:, :300]
    assert torch.equal(deq, fake_quant(x, 1, 128))
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself, away from the subnormal range
    big = x.abs() > scale.repeat_interleave(128, 1)[:, :300] * 2**-6
    assert ((deq - x).abs() <= x.abs() * 2**-4 + 1e-12)[big].all()
    assert (deq - x)[2, :128].abs().max() < 0.2  # the other tiles of row 2 keep their precision


def test_linear_forward_and_gradients_follow_the_recipe():
    g = torch.Generator().manual_seed(1)
    M, K, N = 200, 384, 256
    x = torch.randn(2, M // 2, K, generator=g, requires_grad=True)
    w = torch.randn(N, K, generator=g) * 0.05
    dy = torch.randn(2, M // 2, N, generator=g)
    layer = Fp8Linear(K, N, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    y = layer(x)
    y.backward(dy)
    x2, dy2 = x.detach().reshape(M, K), dy.reshape(M, N)
    w_q = fake_quant(w, 128, 128)  # weights: 128×128 blocks, in all GEMMs
    assert torch.allclose(y.reshape(M, N), fake_quant(x2, 1, 128) @ w_q.t(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad.reshape(M, K), fake_quant(dy2, 1, 128) @ w_q, rtol=1e-5, atol=1e-5)
    # wgrad: dyᵀ and xᵀ tiled along the token dimension (1×128 runs of their rows)
    want_dw = fake_quant(dy2.t(), 1, 128) @ fake_quant(x2.t(), 1, 128).t()
    assert torch.allclose(layer.weight.grad, want_dw, rtol=1e-5, atol=1e-4)
    # and the recipe stays close to the exact fp32 products
    for got, exact in ((y.reshape(M, N), x2 @ w.t()), (x.grad.reshape(M, K), dy2 @ w),
                       (layer.weight.grad, dy2.t() @ x2)):
        assert (got - exact).norm() / exact.norm() < 0.05


def test_conversion_keeps_parameters_head_and_unaligned_layers():
    cfg = ModelConfig.from_preset("tiny")
    model = build_model(cfg, seed=0)
    params = {n: p for n, p in model.named_parameters()}
    report = convert_to_fp8_training(model)
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert type(model.lm_head) is nn.Linear and type(model.mtp[0].eh_proj) is nn.Linear
    attn = model.model.layers[1].self_attn
    assert isinstance(attn.q_b_proj, Fp8Linear) and isinstance(attn.o_proj, Fp8Linear)
    # 80 = kv_lora_rank 64 + rope 16 and kv_b's 64 inputs are not multiples of 128: kept, and said so
    assert type(attn.kv_a_proj_with_mqa) is nn.Linear and type(attn.kv_b_proj) is nn.Linear
    assert "model.layers.1.self_attn.kv_b_proj (512x64: not a multiple of 128)" in report.kept
    assert "model.layers.0.mlp.gate_proj" in report.converted
    assert "model.layers.1.mlp.shared_experts.down_proj" in report.converted


def test_fp8_training_stays_close_to_fp32():
    cfg = ModelConfig.from_preset("tiny")
    cfg.num_hidden_layers, cfg.num_nextn_predict_layers, cfg.vocab_size = 2, 0, 512
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, 64, (24, 4, 65), generator=g)  # a small vocabulary used: the loss drops fast
    data[:, :, 1::2] = (data[:, :, 0:-1:2] * 7 + 3) % 512  # odd positions follow from the one before

    def train(fp8: bool) -> list[float]:
        model = build_model(cfg, seed=0)
        if fp8:
            assert convert_to_fp8_training(model).converted
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for batch in data:
            logits = model(batch[:, :-1])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    ref, fp8 = train(False), train(True)
    assert ref[-1] < 0.5 * ref[0] and fp8[-1] < 0.5 * fp8[0]  # both learn
    assert fp8 != ref  # the GEMMs really ran in FP8
    # DeepSeek-V3 reports < 0.25% relative loss error against bf16 at scale; step by step here
    gaps = [abs(a - b) / b for a, b in zip(fp8, ref)]
    assert max(gaps) < 0.01, gaps
    assert abs(sum(fp8[-8:]) - sum(ref[-8:])) / sum(ref[-8:]) < 0.005


def _expert_problem(seed=4, counts=(37, 0, 64, 11)):
    g = torch.Generator().manual_seed(seed)
    G, K, N = len(counts), 96, 64
    counts = torch.tensor(counts)
    M = int(counts.sum())
    x = torch.randn(M, K, generator=g)
    x[5, 7] = 50.0  # an outlier costs its own row
    w = torch.randn(G, N, K, generator=g) * 0.05
    dy = torch.randn(M, N, generator=g)
    return x, w, dy, counts


def test_expert_projections_follow_the_row_wise_recipe():
    """Forward: tokens scaled per row, each expert's weight per output channel; dgrad: the output gradient
    per row, the weight per input channel; wgrad exact (compute dtype). Checked against a loop over the
    experts with an independent row-by-row fake quantisation, an expert with no tokens included."""
    x, w, dy, counts = _expert_problem()
    x, w = x.requires_grad_(), w.clone().requires_grad_()
    y = _Fp8GroupedMM.apply(x, w, counts)
    y.backward(dy)
    starts = torch.cumsum(counts, 0) - counts
    want_y, want_dx, want_dw = [], [], []
    for e, (s, c) in enumerate(zip(starts.tolist(), counts.tolist())):
        xe, dye = x.detach()[s:s + c], dy[s:s + c]
        want_y.append(fake_quant(xe, 1, xe.shape[1]) @ fake_quant(w.detach()[e], 1, xe.shape[1]).t())
        want_dx.append(fake_quant(dye, 1, dye.shape[1]) @ fake_quant(w.detach()[e].t(), 1, w.shape[1]).t())
        want_dw.append(dye.t() @ xe)
    assert torch.allclose(y, torch.cat(want_y), rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad, torch.cat(want_dx), rtol=1e-5, atol=1e-5)
    assert torch.allclose(w.grad, torch.stack(want_dw), rtol=1e-5, atol=1e-5)
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))  # no tokens, no gradient
    exact = torch.cat([x.detach()[s:s + c] @ w.detach()[e].t() for e, (s, c) in enumerate(zip(starts.tolist(),
                                                                                             counts.tolist()))])
    assert (y - exact).norm() / exact.norm() < 0.05


def test_the_cuda_call_has_the_layouts_the_kernel_checks():
    """torch._scaled_grouped_mm's meta kernel carries the CUDA kernel's checks (dtypes, row-/column-major
    operands, 16-byte strides, scale shapes): our call passes them, on meta tensors, here on the CPU."""
    M, K, N, G = 96, 128, 64, 4
    aq, a_s = quantize_rows(torch.randn(M, K, device="meta"))
    bq, b_s = quantize_rows(torch.randn(G, N, K, device="meta"))
    offs = torch.empty(G, dtype=torch.int32, device="meta")
    out = scaled_grouped_mm(aq, a_s, bq, b_s, offs, torch.bfloat16)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    # the dgrad operand: the weight transposed then made contiguous, quantised along its new rows
    wt_q, wt_s = quantize_rows(torch.randn(G, N, K, device="meta").transpose(-2, -1).contiguous())
    dyq, dy_s = quantize_rows(torch.randn(M, N, device="meta"))
    assert scaled_grouped_mm(dyq, dy_s, wt_q, wt_s, offs, torch.bfloat16).shape == (M, K)


def test_conversion_puts_the_routed_experts_in_fp8_and_they_train():
    cfg = ModelConfig.from_preset("tiny")
    model = build_model(cfg, seed=0)
    report = convert_to_fp8_training(model)
    assert report.experts == [f"model.layers.{i}.mlp.experts" for i in (1, 2, 3)] + ["mtp.0.block.mlp.experts"]
    assert "routed-expert layers in FP8" in report.summary()
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, Fp8Experts) and experts.gate_proj.requires_grad
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    assert experts.gate_proj.grad is not None and experts.gate_proj.grad.abs().sum() > 0


@pytest.mark.cuda
def test_scaled_grouped_mm_equals_the_definition_on_gpu():
    x, w, dy, counts = _expert_problem()
    x, w, dy = x.cuda().bfloat16().requires_grad_(), w.cuda().bfloat16().requires_grad_(), dy.cuda().bfloat16()
    y = _Fp8GroupedMM.apply(x, w, counts.cuda())
    y.backward(dy)
    ref_x, ref_w = x.detach().float().cpu(), w.detach().float().cpu()
    want = fp8_grouped_mm_reference(*quantize_rows(ref_x), *quantize_rows(ref_w), counts)
    assert torch.allclose(y.float().cpu(), want, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.cuda
def test_scaled_mm_equals_the_definition_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 512, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    layer = Fp8Linear(512, 384, bias=False, device="cuda")
    y = layer(x)
    y.float().square().sum().backward()
    xr = x.detach().float()
    assert torch.allclose(y.float(), fake_quant(xr, 1, 128) @ fake_quant(layer.weight.detach(), 128, 128).t(),
                          rtol=2e-2, atol=2e-2)
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
