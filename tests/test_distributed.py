"""deepmoe.parallel on CPU with gloo: 2 (and 4) ranks against 1 on the same global batches and seed.

Every multi-rank case runs in processes spawned from here (torch.multiprocessing, one thread each) and is
bounded in time: a hang fails the test instead of blocking the suite. The layouts:
- FSDP alone: world 2, ep 1, dp_shard 2: every parameter sharded over both ranks, each rank reading half of
  every global batch;
- EP alone: world 2, ep 2, dp_shard 1: each rank holds 8 of the 16 routed experts whole and exchanges tokens
  with the other; outside the routed experts the two ranks are still data parallel over their halves;
- both: world 4, ep 2, dp_shard 2: experts split over ep and FSDP-sharded over dp_shard.

Tolerance of the loss comparisons: 2 ranks add the same terms as 1 in another order (gradients summed
across ranks, the grad norm from shard sums, the routed outputs combined after an all-to-all), a relative
difference of a few fp32 ulps (~1e-7) per step, which training carries on and Adam may magnify a little.
Measured: <= 5e-7 absolute on losses of ~7, and ~1.4e-6 on grad norms of ~3, over these steps. The bounds, 2e-6
relative on losses and 1e-5 on grad norms, leave ~10x headroom and still catch a gradient scaled by the
wrong factor (a doubled divide on the experts moved the grad norm by 2e-3 and the fourth loss by 7e-6).
"""

from __future__ import annotations

import ast
import json
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from deepmoe.cli import main
from deepmoe.parallel.mesh import ParallelError, check_layout
from deepmoe.train import loop
from deepmoe.train.config import TrainConfig, resolve

from .conftest import v3_config, write_code_corpus

STEPS = 3
LOSS_RTOL, NORM_RTOL = 2e-6, 1e-5
TIMEOUT_S = 90  # per launch: startup is ~5 s per process on 2 busy cores, the runs a few seconds more


# ---- launching ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    fn(rank, *args)


def launch(world: int, fn, *args, timeout: float = TIMEOUT_S) -> None:
    """Run fn(rank, *args) on `world` spawned ranks; fail (and kill them) past `timeout` seconds."""
    ctx = mp.start_processes(_worker, args=(world, _free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks of {fn.__name__} did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


# ---- the model package stays single-device ---------------------------------------------------------------
def test_model_package_does_not_import_torch_distributed():
    root = Path(__file__).parents[1] / "deepmoe" / "model"
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [f"{path.name}: {n}" for n in names if n.startswith("torch.distributed")]
    assert len(list(root.rglob("*.py"))) >= 10  # the walk saw the package
    assert found == []


def test_layout_errors_name_the_rank():
    assert check_layout(4, 2, 16, rank=0) == 2
    assert check_layout(2, 1, None, rank=0) == 2
    with pytest.raises(ParallelError, match=r"rank 3: the world size 3 does not fit .* ep=2"):
        check_layout(3, 2, 16, rank=3)
    with pytest.raises(ParallelError, match=r"rank 1: 16 routed experts cannot be split evenly over ep=3"):
        check_layout(3, 3, 16, rank=1)
    with pytest.raises(ParallelError, match=r"rank 0: the world size 1 does not fit"):
        check_layout(1, 2, 16)


def test_ep_without_enough_processes_is_refused(micro):
    root, argv = micro
    cfg, model_cfg = resolve(_train_config(argv, root / "refused", ep=2), False)
    with pytest.raises(ParallelError, match="world size 1 does not fit the mesh"):
        loop.Trainer(cfg, model_cfg)


# ---- expert-parallel dispatch and combine against the local MoE ------------------------------------------
def _dispatch_worker(rank: int, out: str) -> None:
    import torch.distributed as dist

    from deepmoe.model.experts import Experts
    from deepmoe.parallel.expert_parallel import ExpertParallelExperts
    from deepmoe.parallel.mesh import build_mesh

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = build_mesh("cpu", world, world, 16)
    torch.manual_seed(0)  # every rank draws the same experts and the same global inputs
    experts = Experts(v3_config())
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    N, k, d = 5, 4, 64
    x = torch.randn(world, N, d, requires_grad=True)
    # experts 3, 9 and 12..15 get no tokens: 12..15 are all of rank 1's last four, so in the 2-rank case its
    # grouped GEMMs see empty groups; rank 1's tokens below go to experts 0..7 only, so it sends nothing to
    # itself and its own slice comes back from rank 0 alone
    allowed = [torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 10, 11])] + [torch.tensor([0, 1, 2, 4, 5, 6, 7])] * (world - 1)
    idx = torch.stack([torch.stack([a[torch.randperm(len(a))[:k]] for _ in range(N)]) for a in allowed])
    w = torch.rand(world, N, k, requires_grad=True)
    ref = experts(x.reshape(-1, d), idx.reshape(-1, k), w.reshape(-1, k)).view(world, N, d)
    g = torch.randn(world, N, d)
    (ref * g).sum().backward()
    ep = ExpertParallelExperts(experts, mesh.ep)
    xl, wl = x[rank].detach().clone().requires_grad_(), w[rank].detach().clone().requires_grad_()
    y = ep(xl, idx[rank], wl)
    (y * g[rank]).sum().backward()
    result = {"y": y.detach(), "y_ref": ref[rank].detach(), "dx": xl.grad, "dx_ref": x.grad[rank],
              "dw": wl.grad, "dw_ref": w.grad[rank]}
    for name in ("gate_proj", "up_proj", "down_proj"):
        result[f"d{name}"] = getattr(ep, name).grad.full_tensor()  # gathered over ep: all 16 experts
        result[f"d{name}_ref"] = getattr(experts, name).grad
    torch.save(result, f"{out}-{rank}.pt")
    dist.destroy_process_group()


def test_expert_parallel_matches_local_experts(tmp_path):
    launch(2, _dispatch_worker, str(tmp_path / "ep"))
    for rank in range(2):
        r = torch.load(tmp_path / f"ep-{rank}.pt")
        assert r["y"].abs().max() > 0.01
        for name in ("y", "dx", "dw", "dgate_proj", "dup_proj", "ddown_proj"):
            torch.testing.assert_close(r[name], r[f"{name}_ref"], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
        idle = r["dgate_proj_ref"][[3, 9, 12, 13, 14, 15]]
        assert torch.equal(r["dgate_proj"][[3, 9, 12, 13, 14, 15]], idle) and idle.abs().max() == 0


# ---- training: 2 or 4 ranks against 1 --------------------------------------------------------------------
@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus = write_code_corpus(root)
    cfg_path = root / "micro.json"
    cfg_path.write_text(json.dumps(v3_config(vocab_size=512, rope_scaling=None, max_position_embeddings=64)
                                   .to_hf_dict()))
    # a constant rate: the schedule must not depend on --steps, which the resume test changes
    argv = dict(model_config=str(cfg_path), data=str(corpus), cache_dir=str(root / "cache"), seq_len=32,
                batch_size=4, grad_accum=2, steps=STEPS, warmup_steps=2, lr=3e-3, schedule="constant",
                aux_loss_alpha=0.001, bias_update_rate=0.01, eval_every=100, checkpoint_every=100, progress=False,
                sample_tokens=0, plots=False)
    return root, argv


def _train_config(argv: dict, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**argv, "out": str(out), **kw})


def _steps(rank: int, argv: dict, out: str, ep: int, ac: bool) -> None:
    """STEPS training steps, then a checkpoint (gathered to rank 0, written by it); saves each rank's records
    and routing biases."""
    cfg, model_cfg = resolve(_train_config(argv, Path(out), ep=ep, activation_checkpointing=ac), False)
    trainer = loop.Trainer(cfg, model_cfg)
    records = [trainer.train_step() for _ in range(STEPS)]
    biases = [m.gate.e_score_correction_bias.tolist() for m in trainer.moe]
    trainer.save()
    trainer.saves.wait()
    trainer.dist.close()
    Path(f"{out}-rank{rank}.json").write_text(json.dumps({"records": records, "biases": biases}))


@pytest.fixture(scope="module")
def reference(micro):
    """One process: STEPS + 2 steps, and the biases after STEPS."""
    root, argv = micro
    cfg, model_cfg = resolve(_train_config(argv, root / "one", steps=STEPS + 2), False)
    trainer = loop.Trainer(cfg, model_cfg)
    records, biases = [], None
    for step in range(STEPS + 2):
        records.append(trainer.train_step())
        if step + 1 == STEPS:
            biases = [m.gate.e_score_correction_bias.tolist() for m in trainer.moe]
    return records, biases


def _assert_same_steps(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "ce", "mtp_loss", "aux_loss"):
            assert math.isclose(g[key], w[key], rel_tol=LOSS_RTOL), (g["step"], key, g[key], w[key])
        assert math.isclose(g["grad_norm"], w["grad_norm"], rel_tol=NORM_RTOL), (g["step"], g["grad_norm"],
                                                                                 w["grad_norm"])
        assert g["max_vio"] == w["max_vio"] and g["expert_share"] == w["expert_share"]  # global counts, exact


@pytest.mark.parametrize("world,ep,ac", [(2, 1, False), (2, 2, True), (4, 2, False)],
                         ids=["fsdp-dp2", "ep2-checkpointed", "fsdp2-x-ep2"])
def test_ranks_match_one_process(micro, reference, world, ep, ac):
    root, argv = micro
    out = root / f"w{world}-ep{ep}"
    launch(world, _steps, argv, str(out), ep, ac, timeout=TIMEOUT_S * world // 2)
    ref_records, ref_biases = reference
    runs = [json.loads(Path(f"{out}-rank{r}.json").read_text()) for r in range(world)]
    for run in runs:  # every rank logs the same global figures and keeps the same biases
        _assert_same_steps(run["records"], ref_records[:STEPS])
        assert run["biases"] == ref_biases
    assert any(abs(b) > 0 for layer in ref_biases for b in layer)  # balancing moved the biases


def test_checkpoint_of_two_ranks_resumes_on_one(micro, reference):
    root, argv = micro
    out = root / "w2-ep2"
    if not out.is_dir():  # the 2-rank EP run of test_ranks_match_one_process, when run alone
        launch(2, _steps, argv, str(out), 2, True)
    # the run was launched with --ep 2; one process holds every expert: --ep 1 (a resume may change it)
    flags = ["--out", str(out), "--resume", "--steps", str(STEPS + 2), "--ep", "1", "--no-progress"]
    assert main(["train", *flags]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in lines if r["kind"] == "train" and r["step"] > STEPS]
    _assert_same_steps(resumed, reference[0][STEPS:])
