"""Our forward pass against transformers' DeepseekV2/V3 (the numerical contract), both directions."""

import logging

import pytest
import torch

import deepmoe
from deepmoe.generate import generate

from .conftest import hf_random_model, hf_v2_config, hf_v3_config, rel_err, v2_config, v3_config

transformers = pytest.importorskip("transformers")


TOL = 1e-5  # fp32: equal to rounding
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def assert_as_accurate(exact: torch.Tensor, theirs: torch.Tensor, mine: torch.Tensor, dtype) -> None:
    """fp32: ours equals transformers' to rounding. bf16: the two round in different places (we rotate and
    combine experts in fp32, transformers in bf16), so each side has a few positions where a near-tie router
    picked another expert (up to ~1e-1 off), at different positions. bf16 is held to the exact fp32 answer
    instead, position by position: our typical (median) error may be no more than 2x transformers' own."""
    if dtype == torch.float32:
        assert rel_err(theirs, mine) <= TOL
    else:
        err_theirs, err_mine = _median_error(exact, theirs), _median_error(exact, mine)
        assert err_mine <= 2 * err_theirs, (err_mine, err_theirs)


def _median_error(exact: torch.Tensor, approx: torch.Tensor) -> float:
    per_position = (approx.float() - exact.float()).abs().amax(-1) / exact.float().abs().max()
    return per_position.median().item()


@DTYPES
@pytest.mark.parametrize("make_hf_cfg", [hf_v2_config, hf_v3_config], ids=["v2", "v3"])
def test_checkpoint_written_by_transformers_matches_its_logits(make_hf_cfg, dtype, tmp_path, caplog):
    """The contract: a config.json and weights transformers itself wrote (its own defaults, no field of ours;
    V2's file has no scoring_func and must still route with softmax) give transformers' logits."""
    hf = hf_random_model(make_hf_cfg(), dtype=dtype)
    hf.save_pretrained(tmp_path)  # transformers' own file layout (per-expert keys, no MTP weights)
    with caplog.at_level(logging.WARNING, logger="deepmoe"):
        ours = deepmoe.load_pretrained(tmp_path, dtype=dtype).eval()
    assert "config omits" not in caplog.text and "typos" not in caplog.text  # transformers' file is complete
    if hf.config.model_type == "deepseek_v3":
        assert "holds no MTP weights" in caplog.text and len(ours.mtp) == 0
    assert ours.inv_freq.dtype == torch.float32
    exact = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, hf.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, theirs = exact(x).logits, hf(x).logits
        for absorb in (False, True):
            assert_as_accurate(ref, theirs, ours(x, absorb=absorb), dtype)


@DTYPES
@pytest.mark.parametrize("make_hf_cfg", [hf_v2_config, hf_v3_config], ids=["v2", "v3"])
def test_positions_far_from_zero(make_hf_cfg, dtype, tmp_path):
    """A chunk that starts at position 30000 (no cache): both attention forms must place its keys there too."""
    hf = hf_random_model(make_hf_cfg(max_position_embeddings=40000), dtype=dtype, scale_qk=4.0)
    hf.save_pretrained(tmp_path)
    ours = deepmoe.load_pretrained(tmp_path, dtype=dtype).eval()
    exact = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, hf.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(30000, 30032).expand(2, -1)
    with torch.no_grad():
        ref, theirs = exact(x, position_ids=positions).logits, hf(x, position_ids=positions).logits
        for absorb in (False, True):
            assert_as_accurate(ref, theirs, ours(x, start_pos=30000, absorb=absorb), dtype)


def _first_attention_output(model, run) -> torch.Tensor:
    got = {}

    def hook(module, args, out):
        got["out"] = (out[0] if isinstance(out, tuple) else out).float()

    handle = model.model.layers[0].self_attn.register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return got["out"]


@pytest.mark.parametrize("make_hf_cfg", [hf_v2_config, hf_v3_config], ids=["v2", "v3"])
def test_bf16_long_range_attention_is_as_accurate_as_transformers(make_hf_cfg, tmp_path):
    """RoPE is relative: a frequency error only shows between tokens far apart. bf16-rounded inverse
    frequencies (the bug: `model.to(bf16)` rounded them) put ~1 rad of phase error between tokens 2k apart;
    fp32 ones, as transformers keeps, leave our bf16 attention as close to the fp32 answer as transformers'."""
    hf16 = hf_random_model(make_hf_cfg(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                       max_position_embeddings=4096), dtype=torch.bfloat16, scale_qk=12.0)
    hf16.save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = deepmoe.load_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    x = torch.randint(0, hf16.config.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = _first_attention_output(ref, lambda: ref(x))[:, -64:]  # the last queries see keys 2k back
        theirs = _first_attention_output(hf16, lambda: hf16(x))[:, -64:]
        mine = _first_attention_output(ours, lambda: ours(x))[:, -64:]
    assert_as_accurate(exact, theirs, mine, torch.bfloat16)
    assert ours.inv_freq.dtype == torch.float32 and torch.equal(ours.inv_freq, hf16.model.rotary_emb.inv_freq)


@DTYPES
@pytest.mark.parametrize("make_cfg", [v2_config, v3_config], ids=["v2", "v3"])
def test_our_save_loads_in_transformers(make_cfg, dtype, tmp_path):
    cfg = make_cfg()
    ours = deepmoe.build_model(cfg, seed=3).eval()
    if cfg.topk_method == "noaux_tc":
        for layer in ours.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    ours = ours.to(dtype)
    deepmoe.save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    exact = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_as_accurate(exact(x).logits, hf(x).logits, ours(x), dtype)
    # and back: every tensor (MTP included) survives our own round trip exactly
    again = deepmoe.load_pretrained(tmp_path, dtype=dtype)
    assert len(again.mtp) == cfg.num_nextn_predict_layers
    a, b = ours.state_dict(), again.state_dict()
    assert list(a) == list(b)
    for (k, t), u in zip(a.items(), b.values(), strict=True):
        assert t.dtype == u.dtype and torch.equal(t, u), k


@pytest.mark.parametrize("make_hf_cfg", [hf_v2_config, hf_v3_config], ids=["v2", "v3"])
def test_tied_embeddings_round_trip_both_ways(make_hf_cfg, tmp_path):
    # transformers writes a tied checkpoint without lm_head.weight; we must load it ...
    hf = hf_random_model(make_hf_cfg(tie_word_embeddings=True))
    hf.save_pretrained(tmp_path / "hf")
    ours = deepmoe.load_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    x = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(hf(x).logits, ours(x)) <= TOL
    # ... write one transformers loads, and load our own again, still tied
    deepmoe.save_pretrained(ours, tmp_path / "ours")
    again = deepmoe.load_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert again.lm_head.weight is again.model.embed_tokens.weight
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))
        assert rel_err(back(x).logits, ours(x)) <= TOL


@DTYPES
def test_greedy_generation_matches_transformers_generate(dtype, tmp_path):
    hf = hf_random_model(hf_v3_config(), seed=5, dtype=dtype)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(tmp_path)
    ours = deepmoe.load_pretrained(tmp_path, dtype=dtype).eval()
    prompt = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = hf.generate(prompt, max_new_tokens=32, do_sample=False)[0].tolist()
    out = generate(ours, prompt, max_new_tokens=32)[0].tolist()
    assert len(out) == len(ref) == 44
    if dtype == torch.float32 or out == ref:
        assert out == ref
        return
    # bf16: the two may part only where the exact (fp32) model itself hesitates between the two tokens
    i = next(j for j in range(44) if out[j] != ref[j])
    exact = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = exact(torch.tensor([ref[:i]])).logits[0, -1]
    margin = (logits[ref[i]] - logits[out[i]]).abs() / logits.abs().max()
    assert margin < 1e-2, f"diverged at token {i} where the fp32 margin is {margin:.3g}: not a near-tie"


def test_fp8_checkpoint_equals_dequantized_twin(tmp_path):
    from .conftest import write_fp8_twin

    cfg = v3_config(num_nextn_predict_layers=0)
    deepmoe.save_pretrained(deepmoe.build_model(cfg, seed=1), tmp_path / "src")
    write_fp8_twin(tmp_path / "src", tmp_path / "fp8", tmp_path / "twin")
    a = deepmoe.load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    b = deepmoe.load_pretrained(tmp_path / "twin", dtype=torch.float32)
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        # and fp8 really changed the weights (the test would be vacuous otherwise)
        src = deepmoe.load_pretrained(tmp_path / "src", dtype=torch.float32)
        assert rel_err(src(x), a(x)) > 1e-4
