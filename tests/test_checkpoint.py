"""Checkpoint I/O: sharding, MTP keys, and clear errors for bad checkpoints."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import deepmoe
from deepmoe.checkpoint import CheckpointError, internal_to_hf
from deepmoe.cli import main as cli

from .conftest import v3_config, write_fp8_twin
from .crashes import Crash, crash_at, run_until_complete


@pytest.fixture
def saved(tmp_path):
    model = deepmoe.build_model(v3_config(), seed=4)
    deepmoe.save_pretrained(model, tmp_path / "m")
    return model, tmp_path / "m"


def test_sharded_save_has_index_and_mtp_keys(tmp_path):
    model = deepmoe.build_model(v3_config(), seed=4)
    deepmoe.save_pretrained(model, tmp_path, max_shard_size=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((tmp_path / f).is_file() for f in files)
    L = model.config.num_hidden_layers
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.15.down_proj.weight",
                "self_attn.kv_b_proj.weight"):
        assert f"model.layers.{L}.{key}" in index["weight_map"]
    back = deepmoe.load_pretrained(tmp_path, dtype=torch.float32)
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
        h = back.hidden_states(x)
        assert all(torch.equal(a, b) for a, b in zip(back.mtp_logits(h, x), model.mtp_logits(model.hidden_states(x), x),
                                                     strict=True))
    # a re-save unsharded removes the stale shards and index
    deepmoe.save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def _rewrite(path, edit):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_missing_key_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing weights for model\.layers\.1\.mlp\.experts\.up_proj"):
        deepmoe.load_pretrained(path)


def test_unexpected_key_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.rotary.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected key model\.layers\.0\.self_attn\.rotary"):
        deepmoe.load_pretrained(path)


def test_wrong_shape_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("model.layers.2.self_attn.o_proj.weight", torch.zeros(64, 32)))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight has shape \[64, 32\], config expects \[64, 64\]"):
        deepmoe.load_pretrained(path)


def test_truncated_file(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        deepmoe.load_pretrained(path)


def test_unsupported_architecture_and_missing_files(saved, tmp_path):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        deepmoe.load_pretrained(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        deepmoe.load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        deepmoe.load_pretrained(tmp_path / "empty")


def test_index_pointing_at_missing_shard(tmp_path):
    model = deepmoe.build_model(v3_config(), seed=4)
    deepmoe.save_pretrained(model, tmp_path, max_shard_size=200_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists {victim.name}, which does not exist"):
        deepmoe.load_pretrained(tmp_path)


def test_expert_keys_are_stacked_in_memory(saved):
    model, path = saved
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.2.mlp.experts.7.gate_proj.weight")
    torch.testing.assert_close(model.model.layers[2].mlp.experts.gate_proj[7], w)
    assert model.model.layers[2].mlp.experts.gate_proj.shape == (16, 32, 64)


def test_bf16_load_keeps_routing_bias_fp32(saved):
    _, path = saved
    m = deepmoe.load_pretrained(path, dtype=torch.bfloat16)
    gate = m.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32


def test_convert_fp8_to_bf16_and_reshard(tmp_path, capsys):
    cfg = v3_config(num_nextn_predict_layers=0)
    deepmoe.save_pretrained(deepmoe.build_model(cfg, seed=1), tmp_path / "src")
    write_fp8_twin(tmp_path / "src", tmp_path / "fp8", tmp_path / "twin", block=(128, 128))
    assert cli(["convert", str(tmp_path / "fp8"), str(tmp_path / "out"), "--max-shard-size", "100KB"]) == 0
    assert "dequantized from fp8" in capsys.readouterr().out
    out = tmp_path / "out"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert len(list(out.glob("model-*.safetensors"))) > 1
    a = deepmoe.load_pretrained(out, dtype=torch.float32).state_dict()
    b = deepmoe.load_pretrained(tmp_path / "twin", dtype=torch.float32).state_dict()
    # converted = bf16(dequantized fp8), tensor for tensor; the routing bias stays fp32
    assert a.keys() == b.keys()
    for k in b:
        want = b[k] if k.endswith("e_score_correction_bias") else b[k].bfloat16().float()
        assert torch.equal(a[k], want), k


def test_load_streams_without_a_second_copy(tmp_path):
    """Peak memory while loading stays near one model, not model + state dict."""
    cfg = v3_config(vocab_size=32000, hidden_size=256, num_hidden_layers=4, n_routed_experts=64,
                    moe_intermediate_size=256, num_nextn_predict_layers=0)
    model = deepmoe.build_model(cfg)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    deepmoe.save_pretrained(model, tmp_path)
    del model
    # Anonymous memory only: mmapped safetensors pages are reclaimable page cache, not a second copy.
    script = (
        "import re, threading, time, torch, deepmoe\n"
        "def anon(): return int(re.search(r'RssAnon:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
        "base, peak, done = anon(), [0], []\n"
        "def watch():\n"
        "    while not done:\n"
        "        peak[0] = max(peak[0], anon()); time.sleep(0.0005)\n"
        "t = threading.Thread(target=watch); t.start()\n"
        f"m = deepmoe.load_pretrained({str(tmp_path)!r}, dtype=torch.float32)\n"
        "done.append(1); t.join(); peak[0] = max(peak[0], anon())\n"
        "print(peak[0] - base)\n"
    )
    peak = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()[-1])
    assert nbytes > 150e6
    assert peak > 0.9 * nbytes  # the measurement sees the model itself
    assert peak < 1.5 * nbytes, f"peak {peak / 1e6:.0f} MB for a {nbytes / 1e6:.0f} MB model"


def test_cli_info_prints_counts(capsys):
    assert cli(["info", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "37.55B" in out and "71.1x smaller" in out
    # the count training prints (main model + MTP's own parameters) has a row of its own, so that the two
    # figures a user meets (10.62M from info, 12.62M from train for tiny) are both explained
    assert cli(["info", "--preset", "tiny"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("with MTP"))
    with torch.device("meta"):
        trained = deepmoe.DeepSeekModel(deepmoe.ModelConfig.from_preset("tiny")).num_parameters()
    assert int(row.split()[3].replace(",", "")) == trained
    assert cli(["info", "--preset", "missing"]) == 2
    assert "choose from" in capsys.readouterr().err


def test_layers_beyond_config_are_unexpected_unless_they_are_mtp(saved):
    model, path = saved
    cfg = json.loads((path / "config.json").read_text())
    # a decoder layer the config does not have (layer 2 of 3 when it says 2) is an error; MTP layers are not
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2, "num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match=r"unexpected key model\.layers\.2\..*2 layers \+ 0 MTP"):
        deepmoe.load_pretrained(path)
    (path / "config.json").write_text(json.dumps(cfg))
    m = deepmoe.load_pretrained(path, dtype=torch.float32, load_mtp=False)
    assert len(m.mtp) == 0
    assert torch.equal(m.lm_head.weight, model.lm_head.weight)


def _weights_view_of_transformers(path):
    """The tensors transformers would read: model.safetensors if present, else the index's files
    (transformers' `_get_resolved_checkpoint_files` checks in that order)."""
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for key, name in weight_map.items():
        with safe_open(str(path / name), "pt") as f:
            out[key] = f.get_tensor(key)
    return out


@pytest.mark.parametrize("old_shard,new_shard", [(None, None), (900_000, 900_000), (900_000, None),
                                                 (None, 900_000), (900_000, 600_000)],  # 3 and 4 shards
                         ids=["single-single", "same-shard-names", "sharded-single", "single-sharded",
                              "reshard"])
def test_resave_into_a_checkpoint_directory_survives_a_crash_at_every_step(tmp_path, monkeypatch, old_shard,
                                                                            new_shard):
    big = 10**12
    old, new = (deepmoe.build_model(v3_config(), seed=s) for s in (1, 2))
    hf_old, hf_new = ({k: t.contiguous() for k, t in internal_to_hf(m)} for m in (old, new))
    deepmoe.save_pretrained(old, tmp_path, max_shard_size=old_shard or big)
    seen = []

    def check():
        got = deepmoe.load_pretrained(tmp_path, dtype=torch.float32).state_dict()
        which = "old" if all(torch.equal(got[k], v) for k, v in old.state_dict().items()) else "new"
        assert got.keys() == new.state_dict().keys()
        assert which == "old" or all(torch.equal(got[k], v) for k, v in new.state_dict().items())
        hf = _weights_view_of_transformers(tmp_path)
        ref = hf_old if all(torch.equal(hf[k], v) for k, v in hf_old.items() if k in hf) else hf_new
        assert hf.keys() == ref.keys() and all(torch.equal(hf[k], v) for k, v in ref.items())
        seen.append(which)

    steps = run_until_complete(monkeypatch, lambda: deepmoe.save_pretrained(new, tmp_path,
                                                                           max_shard_size=new_shard or big), check)
    assert steps >= 3 and seen[0] == "old" and seen[-1] == "new"
    # the end state is a plain checkpoint of the new layout: no temp files, no stale shards
    index = tmp_path / "model.safetensors.index.json"
    names = set(json.loads(index.read_text())["weight_map"].values()) if new_shard else {"model.safetensors"}
    files = {p.name for p in tmp_path.iterdir()}
    assert {f for f in files if not f.startswith(".")} == names | {"config.json"} | ({index.name} if new_shard else set())
    assert not any(f.startswith(".model") for f in files)  # (a crashed config.json write may leave its temp)


def test_staged_shards_load_in_transformers(tmp_path, monkeypatch):
    """Re-saving with the same shard names stages the new shards under temp names the index points at;
    transformers loads that state too."""
    transformers = pytest.importorskip("transformers")
    old, new = (deepmoe.build_model(v3_config(num_nextn_predict_layers=0), seed=s) for s in (1, 2))
    deepmoe.save_pretrained(old, tmp_path, max_shard_size=900_000)
    index = tmp_path / "model.safetensors.index.json"
    for k in range(100):
        with crash_at(monkeypatch, k):
            with pytest.raises(Crash):
                deepmoe.save_pretrained(new, tmp_path, max_shard_size=900_000)
        if any(name.startswith(".") for name in json.loads(index.read_text())["weight_map"].values()):
            break
    else:
        raise AssertionError("no step of the save had the index on staged shards")
    deepmoe.save_pretrained(new, tmp_path / "clean")
    x = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        staged, clean = (transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)(x).logits
                         for p in (tmp_path, tmp_path / "clean"))
    assert torch.equal(staged, clean)


@pytest.mark.parametrize("bad_shape", [(1, 1), (2, 2)], ids=["truncated", "too-wide"])
def test_fp8_scale_shape_is_checked_before_loading(tmp_path, monkeypatch, bad_shape):
    deepmoe.save_pretrained(deepmoe.build_model(v3_config(num_nextn_predict_layers=0), seed=1), tmp_path / "src")
    write_fp8_twin(tmp_path / "src", tmp_path / "fp8", tmp_path / "twin", block=(32, 32))
    key = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"  # a [64, 32] weight: 2 x 1 blocks
    _rewrite(tmp_path / "fp8", lambda t: t.__setitem__(key, torch.ones(bad_shape)))
    dequantized = []
    monkeypatch.setattr(deepmoe.checkpoint, "dequantize_fp8_block", lambda *a: dequantized.append(a))
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} has shape \[{bad_shape[0]}, {bad_shape[1]}\], "
                                              r"expected \[2, 1\] for a \[64, 32\] weight in 32x32 blocks"):
        deepmoe.load_pretrained(tmp_path / "fp8")
    assert dequantized == []  # found from the headers, before any weight was read


def test_loaded_model_is_in_eval_mode(tmp_path):
    deepmoe.save_pretrained(deepmoe.build_model(v3_config(num_nextn_predict_layers=0)).train(), tmp_path)
    model = deepmoe.load_pretrained(tmp_path, dtype=torch.float32)
    assert not model.training and not any(m.training for m in model.modules())


def test_mtp_weights_with_a_config_without_mtp_load_without_them(tmp_path, caplog):
    """transformers ignores MTP keys its config does not declare; so do we, saying so once."""
    model = deepmoe.build_model(v3_config(num_nextn_predict_layers=1), seed=2)
    deepmoe.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    with caplog.at_level(logging.WARNING, logger="deepmoe"):
        plain = deepmoe.load_pretrained(tmp_path, dtype=torch.float32)
    assert "holds 1 MTP layer(s) but num_nextn_predict_layers is 0" in caplog.text
    assert len(plain.mtp) == 0
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(plain(x), model.eval()(x))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Not mkstemp's private 0600/0700: on a shared machine others can read a model when the umask says so."""
    old = os.umask(umask)
    try:
        deepmoe.save_pretrained(deepmoe.build_model(v3_config(num_nextn_predict_layers=0)), tmp_path / "m")
    finally:
        os.umask(old)
    for f in ("config.json", "model.safetensors"):
        assert (tmp_path / "m" / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~umask


def test_non_finite_weights_load_with_a_warning_naming_them(saved, caplog):
    _, path = saved
    with caplog.at_level(logging.WARNING, logger="deepmoe"):
        deepmoe.load_pretrained(path, dtype=torch.float32)
    assert "NaN" not in caplog.text  # a clean checkpoint loads quietly

    def poison(t):
        t["model.layers.1.self_attn.o_proj.weight"][0, :3] = float("nan")
        t["model.layers.2.mlp.experts.5.down_proj.weight"][1, 1] = float("inf")  # one expert of a stacked tensor
        t["model.norm.weight"][0] = float("-inf")

    _rewrite(path, poison)
    for dtype in (torch.float32, torch.bfloat16):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deepmoe"):
            model = deepmoe.load_pretrained(path, dtype=dtype)
        assert "3 weight tensor(s) hold NaN or inf values" in caplog.text
        for named in ("model.layers.1.self_attn.o_proj.weight (3 NaN, 0 inf)",
                      "model.layers.2.mlp.experts.5.down_proj.weight (0 NaN, 1 inf)", "model.norm.weight (0 NaN, 1 inf)"):
            assert named in caplog.text, named
        assert "experts.4." not in caplog.text  # the neighbouring expert of the same stacked tensor is clean
        assert model.model.layers[1].self_attn.o_proj.weight.isnan().sum() == 3  # loaded as it is, not repaired
