"""Our forward pass against transformers' DeepseekV2/V3 (the numerical contract), both directions."""

import logging

import pytest
import torch

import deepmoe
from deepmoe.generate import generate

from .conftest import hf_model, rel_err, v2_config, v3_config

transformers = pytest.importorskip("transformers")
TOL = 1e-5


@pytest.mark.parametrize("make_cfg", [v2_config, v3_config], ids=["v2", "v3"])
def test_logits_match_transformers(make_cfg, tmp_path, caplog):
    cfg = make_cfg()
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)  # transformers' own file layout (per-expert keys, no MTP weights)
    with caplog.at_level(logging.WARNING, logger="deepmoe"):
        ours = deepmoe.load_pretrained(tmp_path, dtype=torch.float32).eval()
    if cfg.num_nextn_predict_layers:
        assert "holds no MTP weights" in caplog.text and len(ours.mtp) == 0
    x = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
        for absorb in (False, True):
            assert rel_err(ref, ours(x, absorb=absorb)) <= TOL


@pytest.mark.parametrize("make_cfg", [v2_config, v3_config], ids=["v2", "v3"])
def test_our_save_loads_in_transformers(make_cfg, tmp_path):
    cfg = make_cfg()
    ours = deepmoe.build_model(cfg, seed=3).eval()
    if cfg.topk_method == "noaux_tc":
        for layer in ours.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    deepmoe.save_pretrained(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(hf(x).logits, ours(x)) <= TOL
    # and back: MTP weights survive our own round trip exactly
    again = deepmoe.load_pretrained(tmp_path, dtype=torch.float32)
    assert len(again.mtp) == cfg.num_nextn_predict_layers
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_greedy_generation_matches_transformers_generate():
    cfg = v3_config(num_nextn_predict_layers=0)
    hf = hf_model(cfg, seed=5)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ours = deepmoe.build_model(cfg)
    ours.load_state_dict(_from_hf_state(hf, ours))
    prompt = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = hf.generate(prompt, max_new_tokens=32, do_sample=False)
    out = generate(ours.eval(), prompt, max_new_tokens=32)
    assert out.shape == (1, 44)
    assert out.tolist() == ref.tolist()


def _from_hf_state(hf, ours):
    """Weights of a transformers model in our layout, through the checkpoint name adapter."""
    from deepmoe.checkpoint import hf_to_internal

    state = {k: v.clone() for k, v in ours.state_dict().items()}
    for key, t in _hf_checkpoint_tensors(hf):
        name, expert, _ = hf_to_internal(key, ours.config)
        if expert is None:
            state[name] = t
        else:
            state[name][expert] = t
    return state


def _hf_checkpoint_tensors(hf):
    # transformers keeps experts fused in memory ([E, 2I, d] gate_up); split into checkpoint keys
    for key, t in hf.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix("gate_up_proj")
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", gate[e]
                yield f"{prefix}{e}.up_proj.weight", up[e]
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.removesuffix("down_proj")
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", t[e]
        else:
            yield key, t


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
