"""`deepmoe sft --lora-rank` on a micro model: only the adapter trains (the base, its balancing bias included,
stays bit-identical), the loss falls, resume is bit-exact, RUN/final is base + adapter, the memory report is
exact, and bad LoRA flags are clean errors."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from deepmoe import load_pretrained
from deepmoe.cli import main
from deepmoe.engine.llm import LLM, SamplingParams
from deepmoe.lora import load_adapter, lora_report
from deepmoe.lora.layers import LoraExperts, LoraLinear
from deepmoe.posttrain.config import SFTConfig, resolve
from deepmoe.posttrain.footprint import footprint
from deepmoe.posttrain.sft import SFTTrainer
from deepmoe.train.state import list_checkpoints

from .posttrain_fixtures import TASK, micro_model_dir

STEPS = 6
LORA = ["--lora-rank", "4", "--lora-targets", "all-linear,experts", "--lora-dropout", "0.1"]


def tree_hash(path):
    """One digest of every file under `path`, names and bytes."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return micro_model_dir(tmp_path_factory.mktemp("lora") / "base")


def common(base, out, *extra):
    return ["sft", "--model", str(base), "--task", TASK, "--task-examples", "64", "--val-examples", "8",
            "--eval-problems", "0", "--out", str(out), "--batch-size", "4", "--steps", str(STEPS),
            "--warmup-steps", "1", "--eval-every", "3", "--eval-batches", "1", "--checkpoint-every", "3",
            "--aux-loss-alpha", "0.001", "--no-progress", "--no-plots", *LORA, *extra]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """A LoRA run from the command line, and the digest of the base directory before it."""
    before = tree_hash(base)
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(common(base, out)) == 0
    return out, before


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def trainer(base, out, **kw):
    cfg = SFTConfig(model=str(base), task=TASK, task_examples=16, val_examples=0, eval_problems=0, out=str(out),
                    batch_size=4, steps=2, lr=1e-2, progress=False, plots=False, lora_rank=4, **kw)
    return SFTTrainer(resolve(cfg, False))


def base_tensors(model):
    """Every parameter and buffer that is not an adapter factor, by its name in the base model."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()
            if ".lora_" not in k}


def test_only_the_adapter_trains_and_the_base_stays_bit_identical(base, tmp_path):
    t = trainer(base, tmp_path / "run", aux_loss_alpha=0.01)
    assert t.cfg.bias_update_rate == 0.0  # forced for LoRA: the bias belongs to the base
    optimised = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    factors = {n: p for n, p in t.model.named_parameters() if ".lora_" in n}
    assert optimised == {id(p) for p in factors.values()}
    assert {n for n, p in t.model.named_parameters() if p.requires_grad} == set(factors)
    start = base_tensors(t.model)
    on_disk = load_pretrained(base, dtype=torch.float32).state_dict()
    assert start.keys() == on_disk.keys() and all(torch.equal(start[k], on_disk[k]) for k in start)
    biases = [k for k in start if k.endswith("e_score_correction_bias")]
    assert biases  # the micro model has aux-loss-free routers to leave alone
    b_before = {n: p.detach().clone() for n, p in factors.items() if n.endswith("lora_B")}
    for _ in range(2):
        r = t.train_step()
        assert not r["skipped"] and r["grad_norm"] > 0
    assert all(torch.equal(v, start[k]) for k, v in base_tensors(t.model).items())
    assert all(not torch.equal(p, b_before[n]) for n, p in factors.items() if n.endswith("lora_B"))
    t.metrics.close()


def test_the_memory_report_is_exact(base, tmp_path):
    """Gradient and AdamW bytes as predicted before training equal the tensors training then holds; the LoRA
    run's full-fine-tuning figures equal a full run's."""
    t = trainer(base, tmp_path / "lora")
    f = footprint(t.model)
    assert f["trainable_parameters"] == lora_report(t.model).trainable > 0
    assert f["trainable_fraction"] == pytest.approx(lora_report(t.model).fraction)
    b = t.data.train.batch([0, 1, 2, 3])
    t.forward_backward(b, int(b.target.sum()), [int(b.target[:, 1:].sum())])
    assert sum(p.grad.nbytes for p in t.model.parameters() if p.grad is not None) == f["grad_bytes"]
    t.optimizer.step()
    held = sum(v.nbytes for st in t.optimizer.state.values() for v in st.values())
    assert held == f["optimizer_state_bytes"]
    t.metrics.close()
    full = SFTTrainer(resolve(SFTConfig(model=str(base), task=TASK, task_examples=16, val_examples=0,
                                        eval_problems=0, out=str(tmp_path / "full"), batch_size=4, steps=2,
                                        progress=False, plots=False), False))
    g = footprint(full.model)
    assert g["trainable_parameters"] == g["parameters"] == full.model.num_parameters()
    assert "full_finetune_grad_bytes" not in g
    assert (f["full_finetune_grad_bytes"], f["full_finetune_optimizer_state_bytes"]) == (
        g["grad_bytes"], g["optimizer_state_bytes"])
    assert g["grad_bytes"] > 10 * f["grad_bytes"]
    full.metrics.close()


def test_run_outputs_and_the_loss_falls(reference, base, capsys):
    run, before = reference
    train = [r for r in metrics(run) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert train[-1]["ce"] < train[0]["ce"] - 0.2
    assert [p.name for p in list_checkpoints(run)] == ["step-0000003", "step-0000006"]
    ckpt = list_checkpoints(run)[-1]
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file() and (ckpt / "sft_config.json").is_file()
    assert not (ckpt / "model.safetensors").exists()  # the frozen base is not copied into every checkpoint
    saved = json.loads((run / "sft_config.json").read_text())
    assert (saved["lora_rank"], saved["lora_alpha"], saved["lora_targets"], saved["bias_update_rate"]) == (
        4, 8.0, "all-linear,experts", 0.0)
    assert saved["lr"] == 1e-2  # LoRA's default: 10x full fine-tuning's 1e-3 at this width
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(base.resolve())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["adapter"] == str(run / "adapter") and summary["lora"]["layers"] > 0
    assert summary["lora"]["by_kind"]["routed experts"] > 0
    assert 0 < summary["trainable_fraction"] < 0.1
    assert summary["full_finetune_grad_bytes"] > 10 * summary["grad_bytes"]
    assert tree_hash(base) == before  # the base directory, byte for byte


def test_final_is_the_base_with_the_adapter_merged(reference, base):
    run, _ = reference
    final = load_pretrained(run / "final", dtype=torch.float32).eval()
    adapted = load_pretrained(base, dtype=torch.float32).eval()
    load_adapter(adapted, run / "adapter")
    plain = load_pretrained(base, dtype=torch.float32).eval()
    ids = torch.tensor([[3, 50, 70, 11, 9, 200, 5, 17, 99, 4]])
    with torch.no_grad():
        want, got, untouched = adapted(ids), final(ids), plain(ids)
    assert (got - want).abs().max() < 1e-5
    assert (untouched - want).abs().max() > 1e-3  # the adapter did change the model
    assert json.loads((run / "final" / "sft_config.json").read_text())["lora_rank"] == 4
    # served either way, the same greedy tokens
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [list(range(5, 25)), [7, 8, 9]]
    kw = dict(device="cpu", dtype=torch.float32, kv_cache_bytes=2**22)
    merged = LLM(run / "final", **kw).generate(prompts, params)
    on_base = LLM(base, adapter=run / "adapter", **kw).generate(prompts, params)
    assert [r.token_ids for r in merged] == [r.token_ids for r in on_base]


def test_resume_is_bit_identical(reference, base, tmp_path, monkeypatch):
    """A run stopped after step 4 and resumed from its step-3 checkpoint gives the uninterrupted run's losses
    and adapter exactly (dropout included: its RNG is part of the checkpoint)."""
    run, _ = reference
    out = tmp_path / "crashed"
    original = SFTTrainer.train_step

    def crash_at_step_5(self):
        if self.state["step"] == 4:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(SFTTrainer, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        main(common(base, out))
    monkeypatch.setattr(SFTTrainer, "train_step", original)
    assert [p.name for p in list_checkpoints(out)] == ["step-0000003"]
    assert main(["sft", "--out", str(out), "--resume"]) == 0
    ma, mb = metrics(run), metrics(out)
    assert [(r["kind"], r["step"]) for r in ma] == [(r["kind"], r["step"]) for r in mb]
    for ra, rb in zip(ma, mb):
        for key in ("loss", "ce", "mtp_loss", "aux_loss", "lr", "grad_norm", "expert_share", "val_loss", "tokens"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    wa = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_routed_expert_targets_alone(base, tmp_path):
    t = trainer(base, tmp_path / "run", lora_targets="experts")
    wrapped = [m for m in t.model.modules() if isinstance(m, (LoraLinear, LoraExperts))]
    assert wrapped and all(isinstance(m, LoraExperts) for m in wrapped)
    start = base_tensors(t.model)
    t.train_step()
    t.train_step()
    assert all(torch.equal(v, start[k]) for k, v in base_tensors(t.model).items())
    assert all(m.gate_up.lora_B.abs().sum() > 0 and m.down.lora_B.abs().sum() > 0 for m in wrapped)
    t.metrics.close()
    final = load_pretrained(t.write_final(), dtype=torch.float32).eval()
    ids = torch.tensor([[3, 50, 70, 11, 9, 200, 5]])
    with torch.no_grad():
        t.model.eval()
        assert (final(ids) - t.model(ids)).abs().max() < 1e-5


def test_lora_usage_errors(base, tmp_path, capsys):
    out = tmp_path / "x"
    args = ["sft", "--model", str(base), "--task", TASK, "--out", str(out), "--no-progress"]
    assert main([*args, "--lora-rank", "4", "--lora-targets", "all-linear,q_proj_x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepmoe sft: error: LoRA target(s) 'q_proj_x' match no layer of this model")
    assert "experts.gate_up_proj" in err and "Traceback" not in err
    assert not out.exists()  # refused before any data or weights were loaded
    assert main([*args, "--lora-rank", "0"]) == 2
    assert "--lora-rank: must be >= 1, got 0" in capsys.readouterr().err
    assert main([*args, "--lora-targets", "experts"]) == 2
    assert "need --lora-rank" in capsys.readouterr().err
    assert main([*args, "--lora-rank", "4", "--bias-update-rate", "0.01"]) == 2
    assert "bias_update_rate must be 0" in capsys.readouterr().err
    assert main([*args, "--lora-rank", "4", "--lora-dropout", "1.5"]) == 2
    assert "lora_dropout must be in [0, 1)" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(base), "--student", str(base), "--task", TASK, "--out", str(out),
                 "--lora-rank", "4"]) == 2
    assert "unrecognized arguments: --lora-rank" in capsys.readouterr().err
    assert not out.exists()
