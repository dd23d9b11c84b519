"""Adapter directories: our files round-trip, peft loads them onto transformers' model with the same logits,
we load peft's, and `deepmoe merge` writes a checkpoint with the adapter's logits."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deepmoe
from deepmoe.checkpoint import CheckpointError
from deepmoe.cli import main
from deepmoe.lora import (AdapterError, LoraConfig, apply_lora, load_adapter, merge_adapter, merge_lora,
                          save_adapter)
from deepmoe.lora.apply import lora_layers

from .conftest import hf_random_model, hf_v2_config, hf_v3_config, rel_err, v3_config
from .test_lora import EVERYTHING, _ids, _randomize_b

TOL = 1e-5  # fp32: equal to rounding


def _adapted(make_cfg=v3_config, targets=EVERYTHING, rank=4, **kw):
    model = deepmoe.build_model(make_cfg(**kw), seed=0).eval()
    apply_lora(model, LoraConfig(rank=rank, alpha=2 * rank, targets=targets))
    _randomize_b(model)
    return model


def test_save_then_load_round_trips_exactly(tmp_path):
    model = _adapted()
    save_adapter(model, tmp_path / "adapter", base_model_path=tmp_path)
    fresh = deepmoe.build_model(v3_config(), seed=0).eval()
    report = load_adapter(fresh, tmp_path / "adapter")
    assert report.trainable == sum(p.numel() for _, m in lora_layers(model) for n, p in m.named_parameters()
                                   if "lora_" in n)
    want = {n: p for n, p in model.named_parameters() if "lora_" in n}
    got = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    x = _ids()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    with pytest.raises(CheckpointError, match="carries LoRA adapters"):  # not a checkpoint transformers could read
        deepmoe.save_pretrained(model, tmp_path / "model")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path.resolve()) and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    # the shared-expert MLP is a parameter target (peft's MoE conversion would drop it as a module target)
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in cfg["target_parameters"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in cfg["target_parameters"]
    assert "model.layers.1.self_attn.kv_b_proj" in cfg["target_modules"]


def test_loading_into_the_same_adapters_resumes_and_a_different_one_is_refused(tmp_path):
    model = _adapted(targets=("all-linear",))
    save_adapter(model, tmp_path / "a")
    resumed = deepmoe.build_model(v3_config(), seed=0)
    apply_lora(resumed, LoraConfig(rank=4, alpha=8, targets=("all-linear",), dropout=0.1))  # the run's own setup
    load_adapter(resumed, tmp_path / "a")
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(resumed(_ids()), model(_ids()))
    other = deepmoe.build_model(v3_config(), seed=0)
    apply_lora(other, LoraConfig(rank=8, targets=("all-linear",)))
    with pytest.raises(AdapterError, match="differ"):
        load_adapter(other, tmp_path / "a")


def test_bad_adapters_say_what_is_wrong(tmp_path):
    model = _adapted(targets=("q_a_proj", "experts"))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        load_adapter(deepmoe.build_model(v3_config(), seed=0), tmp_path / "missing")
    # another base: wider experts
    with pytest.raises(AdapterError, match="has shape .* this model expects"):
        load_adapter(deepmoe.build_model(v3_config(moe_intermediate_size=48), seed=0), tmp_path / "a")
    # another architecture: no q compression, so q_a_proj names nothing
    with pytest.raises(AdapterError, match="match no layer"):
        load_adapter(deepmoe.build_model(v3_config(q_lora_rank=None), seed=0), tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(deepmoe.build_model(v3_config(), seed=0), tmp_path / "a")
    cfg_file.write_text(json.dumps(cfg))
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors.pop(next(iter(tensors)))
    save_file(tensors, weights)
    fresh = deepmoe.build_model(v3_config(), seed=0)
    with pytest.raises(AdapterError, match="missing 1 key"):
        load_adapter(fresh, tmp_path / "a")
    assert not any(True for _ in lora_layers(fresh))  # checked before anything changed


def test_merge_writes_a_checkpoint_with_the_adapters_logits(tmp_path):
    """`deepmoe merge` streams base + adapter into a full model directory: its logits are the adapter-on-base
    logits (≤ 1e-5 fp32), and what the adapter does not touch (MTP layers, tokenizer) comes along unchanged."""
    base = deepmoe.build_model(v3_config(), seed=0)
    deepmoe.save_pretrained(base, tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    model = deepmoe.load_pretrained(tmp_path / "base", dtype=torch.float32)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=EVERYTHING))
    _randomize_b(model)
    save_adapter(model, tmp_path / "adapter", base_model_path=tmp_path / "base")
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = deepmoe.load_pretrained(tmp_path / "merged", dtype=torch.float32)
    x = _ids()
    with torch.no_grad():
        want = model(x)
        assert rel_err(want, merged(x)) <= TOL
        assert rel_err(merge_lora(model)(x), merged(x)) <= TOL  # in memory: the same merge
    assert torch.equal(merged.mtp[0].eh_proj.weight, base.mtp[0].eh_proj.weight)
    # the file's MTP copies of the embedding and head took the same update as the main ones
    files = {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        files.update(load_file(f))
    L = v3_config().num_hidden_layers
    assert not torch.equal(files["model.embed_tokens.weight"], base.model.embed_tokens.weight)
    assert torch.equal(files[f"model.layers.{L}.embed_tokens.weight"], files["model.embed_tokens.weight"])
    assert torch.equal(files[f"model.layers.{L}.shared_head.head.weight"], files["lm_head.weight"])
    assert (tmp_path / "merged" / "tokenizer.json").read_text() == "{}"
    # an adapter without a recorded base needs one given
    anonymous = _adapted()
    save_adapter(anonymous, tmp_path / "anonymous")
    with pytest.raises(AdapterError, match="names no base model"):
        merge_adapter(tmp_path / "anonymous", tmp_path / "out")
    merge_adapter(tmp_path / "anonymous", tmp_path / "out", base=tmp_path / "base")
    assert (tmp_path / "out" / "config.json").is_file()


def test_llm_serves_an_adapter_as_its_merge(tmp_path):
    from deepmoe.engine.llm import LLM
    from deepmoe.engine.sequence import SamplingParams
    from deepmoe.tokenizer import train_bpe

    base = deepmoe.build_model(v3_config(num_nextn_predict_layers=0), seed=1)
    with torch.no_grad():
        base.lm_head.weight.mul_(20)
    deepmoe.save_pretrained(base, tmp_path / "base")
    train_bpe([f"def f{i}(x): return x * {i}\n" for i in range(40)], 300).save(tmp_path / "base")
    model = deepmoe.load_pretrained(tmp_path / "base", dtype=torch.float32)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=EVERYTHING))
    _randomize_b(model, std=0.1)
    save_adapter(model, tmp_path / "adapter", base_model_path=tmp_path / "base")
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [list(range(5, 30)), [7, 8, 9]]
    kw = dict(device="cpu", kv_cache_bytes=2**22, block_size=4)
    with_adapter = LLM(tmp_path / "base", adapter=tmp_path / "adapter", **kw).generate(prompts, params)
    merged = LLM(tmp_path / "merged", **kw).generate(prompts, params)
    plain = LLM(tmp_path / "base", **kw).generate(prompts, params)
    assert [r.token_ids for r in with_adapter] == [r.token_ids for r in merged]
    assert [r.token_ids for r in with_adapter] != [r.token_ids for r in plain]


# ---- peft on transformers' model ---------------------------------------------------------------
HF_CONFIGS = pytest.mark.parametrize("make_hf_cfg", [hf_v2_config, hf_v3_config], ids=["v2", "v3"])


@HF_CONFIGS
def test_peft_loads_our_adapter_onto_transformers(make_hf_cfg, tmp_path):
    """Every target kind (attention, dense MLP, shared and routed experts, routers): peft on transformers'
    model gives our logits with our adapter file."""
    peft = pytest.importorskip("peft")
    hf = hf_random_model(make_hf_cfg())
    hf.save_pretrained(tmp_path / "base")
    ours = deepmoe.load_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    apply_lora(ours, LoraConfig(rank=4, alpha=8, targets=EVERYTHING))
    _randomize_b(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_path=tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = _ids()
    with torch.no_grad():
        got, want = theirs(x).logits, ours(x)
        with theirs.disable_adapter():
            assert rel_err(theirs(x).logits, want) > 1e-2  # the adapter matters on their side too
    assert rel_err(want, got) <= TOL


ATTENTION = {"deepseek_v2": ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
             "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]}


@HF_CONFIGS
@pytest.mark.parametrize("how", ["v4_names", "expert_params", "all_linear_rslora", "embedding_head"])
def test_we_load_adapters_peft_trained_on_transformers(make_hf_cfg, how, tmp_path):
    """What peft users write: v4-era module names (peft converts gate/up/down into the fused experts, rank
    doubled, block-diagonal B), expert parameters directly, "all-linear" (routers included) with rsLoRA, or
    the embedding and head named as modules.
    Loaded here they give peft's logits; saved again, peft reads our copy to the same logits."""
    peft = pytest.importorskip("peft")
    hf = hf_random_model(make_hf_cfg())
    hf.save_pretrained(tmp_path / "base")
    attention = ATTENTION[hf.config.model_type]
    kw = {"v4_names": dict(target_modules=attention + ["gate_proj", "up_proj", "down_proj"]),
          "expert_params": dict(target_modules=attention, target_parameters=["gate_up_proj", "down_proj"]),
          "all_linear_rslora": dict(target_modules="all-linear", use_rslora=True),
          "embedding_head": dict(target_modules=attention + ["embed_tokens", "lm_head"])}[how]
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, **kw)).eval()
    _randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = deepmoe.load_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    load_adapter(ours, tmp_path / "theirs")
    x = _ids()
    with torch.no_grad():
        want = theirs(x).logits
        assert rel_err(want, ours(x)) <= TOL
    save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(hf_random_model(make_hf_cfg()), tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_err(want, again(x).logits) <= TOL


def _randomize_peft(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # the factors peft starts at zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_an_embedding_weight_saved_in_the_adapter_replaces_the_base_one(tmp_path):
    """peft saves the base weight of a targeted embedding or head with the adapter (for resized vocabularies)
    and loads it in place of the base's: load_adapter, LLM(adapter=) and merge do the same, so a file whose
    copy differs from the base gives peft's model, not the base's."""
    peft = pytest.importorskip("peft")
    hf = hf_random_model(hf_v3_config())
    hf.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"]))
    _randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    file = tmp_path / "theirs" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors and "base_model.model.lm_head.base_layer.weight" in tensors
    tensors[key] = tensors[key] * 1.5  # as if the embedding had been retrained or resized
    save_file(tensors, file, metadata={"format": "pt"})
    want = peft.PeftModel.from_pretrained(hf_random_model(hf_v3_config()), tmp_path / "theirs").eval()
    ours = deepmoe.load_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    load_adapter(ours, tmp_path / "theirs")
    merge_adapter(tmp_path / "theirs", tmp_path / "merged", base=tmp_path / "base")
    merged = deepmoe.load_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    x = _ids()
    with torch.no_grad():
        w = want(x).logits
        assert rel_err(w, ours(x)) <= TOL and rel_err(w, merged(x)) <= TOL
        plain = deepmoe.load_pretrained(tmp_path / "base", dtype=torch.float32).eval()
        assert rel_err(w, plain(x)) > 1e-2
