"""`deepmoe distill`: logit KD (zero against an identical teacher, learning a smaller student, refusing a
foreign vocabulary) and sequence-level KD (the teacher's checked answers become the student's data)."""

import json

import pytest
import torch

from deepmoe.cli import main
from deepmoe.posttrain.config import DistillConfig, resolve
from deepmoe.posttrain.distill import TEACHER_DATA, DistillTrainer

from .conftest import v3_config
from .posttrain_fixtures import TASK, micro_model_dir


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return micro_model_dir(tmp_path_factory.mktemp("distill") / "teacher", head_scale=30.0)


def distill_trainer(teacher, out, **kw):
    given = dict(teacher=str(teacher), task=TASK, task_examples=16, val_examples=4, eval_problems=0, out=str(out),
                 batch_size=4, steps=3, progress=False, plots=False)
    cfg = DistillConfig(**(given | kw))
    return DistillTrainer(resolve(cfg, False))


def test_kl_to_an_identical_teacher_is_zero(teacher, tmp_path):
    t = distill_trainer(teacher, tmp_path / "self", model=str(teacher), kd_weight=1.0, kd_chunk=7)
    record = t.train_step()
    assert record["kd"] == pytest.approx(0.0, abs=1e-6)
    assert record["ce"] > 1.0  # the data loss is there, just not trained on with kd_weight 1
    assert record["loss"] == pytest.approx(record["mtp_loss"] * t.cfg.mtp_weight, abs=1e-5)
    t.metrics.close()


def test_student_moves_toward_the_teacher(teacher, tmp_path):
    student = micro_model_dir(tmp_path / "student", seed=1)  # the teacher's tokenizer, other weights
    t = distill_trainer(teacher, tmp_path / "kd", model=str(student), kd_weight=1.0, mtp_weight=0.0, steps=12,
                        lr=1e-2, warmup_steps=1)
    b = t.data.train.batch(range(8))

    def kd():
        with torch.no_grad():
            return float(t.objective(b, t.model.hidden_states(b.x)).parts["kd"]) / int(b.target.sum())

    before = kd()
    records = [t.train_step() for _ in range(12)]
    assert kd() < 0.5 * before
    assert all(r["loss"] == pytest.approx(r["kd"]) for r in records)  # kd_weight 1, no MTP: the KL alone
    t.metrics.close()


def test_kd_weight_zero_is_sft_on_the_data(teacher, tmp_path):
    """The baseline of a distillation experiment: same student, data, schedule; only the KL term differs."""
    from deepmoe.posttrain.config import SFTConfig
    from deepmoe.posttrain.sft import SFTTrainer

    student = micro_model_dir(tmp_path / "student", seed=1)
    d = distill_trainer(teacher, tmp_path / "d", model=str(student), kd_weight=0.0)
    assert d.teacher is None
    cfg = SFTConfig(model=str(student), task=TASK, task_examples=16, val_examples=4, eval_problems=0,
                    out=str(tmp_path / "s"), batch_size=4, steps=3, progress=False, plots=False)
    s = SFTTrainer(resolve(cfg, False))
    for _ in range(3):
        rd, rs = d.train_step(), s.train_step()
        assert "kd" not in rd
        assert (rd["loss"], rd["ce"], rd["grad_norm"]) == (rs["loss"], rs["ce"], rs["grad_norm"])
    d.metrics.close()
    s.metrics.close()


def test_distill_a_smaller_student_from_the_command_line(teacher, tmp_path, capsys):
    small = v3_config(vocab_size=512, rope_scaling=None, max_position_embeddings=256, hidden_size=32,
                      num_hidden_layers=2, num_nextn_predict_layers=0)
    cfg_path = tmp_path / "small.json"
    cfg_path.write_text(json.dumps(small.to_hf_dict()))
    out = tmp_path / "kd"
    assert main(["distill", "--teacher", str(teacher), "--student-config", str(cfg_path), "--task", TASK,
                 "--task-examples", "16", "--val-examples", "4", "--eval-problems", "2", "--max-new-tokens", "8",
                 "--out", str(out), "--batch-size", "4", "--steps", "3", "--kl", "mix", "--temperature", "2",
                 "--kd-chunk", "16", "--no-progress", "--no-plots"]) == 0
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert len(train) == 3 and all(r["kd"] > 0 and r["ce"] > 0 and r["mtp_loss"] is None for r in train)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"]["n"] == 2 and summary["accuracy_before"] is None  # a fresh student: no "before"
    assert (out / "final" / "distill_config.json").is_file()
    assert "after     exact match" in capsys.readouterr().out


def test_vocabulary_and_tokenizer_mismatches_are_refused(teacher, tmp_path):
    other_vocab = v3_config(vocab_size=640, rope_scaling=None, max_position_embeddings=256)
    cfg_path = tmp_path / "v640.json"
    cfg_path.write_text(json.dumps(other_vocab.to_hf_dict()))
    with pytest.raises(ValueError, match="the teacher's vocab_size is 512 and the student's 640"):
        distill_trainer(teacher, tmp_path / "a", student_config=str(cfg_path))
    foreign = micro_model_dir(tmp_path / "foreign", vocab=300)  # same sizes, another tokenizer
    with pytest.raises(ValueError, match="the student's tokenizer .* differs from the teacher's"):
        distill_trainer(teacher, tmp_path / "b", model=str(foreign))
    # text-only distillation does not care
    t = distill_trainer(teacher, tmp_path / "c", model=str(foreign), mode="sequence", keep_incorrect=True,
                        max_new_tokens=6)
    t.metrics.close()


def test_sequence_level_data_is_the_teachers_checked_answers(teacher, tmp_path):
    # a random teacher solves nothing: refused unless wrong answers are wanted
    with pytest.raises(ValueError, match="answered none of 16 prompts correctly"):
        distill_trainer(teacher, tmp_path / "strict", student_preset="tiny", mode="sequence", max_new_tokens=6)
    t = distill_trainer(teacher, tmp_path / "all", model=str(teacher), mode="sequence", keep_incorrect=True,
                        max_new_tokens=6)
    lines = [json.loads(line) for line in (tmp_path / "all" / TEACHER_DATA).read_text().splitlines()]
    assert len(lines) == 16 and len(t.data.train) == 16
    assert lines[0]["messages"][0]["content"].startswith("What is ")
    assert t.teacher is None  # nothing compares logits in this mode
    record = t.train_step()
    assert "kd" not in record and record["ce"] > 0
    t.metrics.close()


def test_distill_usage_errors(teacher, tmp_path, capsys):
    base = ["distill", "--teacher", str(teacher), "--task", TASK, "--out", str(tmp_path / "x")]
    assert main([*base]) == 2
    assert "exactly one of --student DIR, --student-preset NAME, --student-config FILE" in capsys.readouterr().err
    assert main([*base, "--student-preset", "nano"]) == 2
    assert "argument --student-preset: invalid choice: 'nano'" in capsys.readouterr().err
    assert main([*base, "--student", str(tmp_path / "missing")]) == 2
    assert "argument --student: " in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["distill", "--teacher", str(teacher), "--student", str(teacher), "--data", str(data), "--mode",
                 "sequence", "--out", str(tmp_path / "y")]) == 2
    assert "sequence-level distillation needs --task" in capsys.readouterr().err
