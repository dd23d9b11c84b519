"""`deepmoe distill`: teach a student model what a teacher model knows, two ways.

logit    On the training data, the student matches the teacher's next-token distribution at every
         trained-on token: loss = (1 − w) · CE(data) + w · T² · KL, forward KL(teacher ‖ student) by
         default (reverse or a mix on request). The teacher runs alongside, frozen, and its logits are
         computed chunk by chunk (posttrain.losses.chunked_kl), so teacher and student logits over a large
         vocabulary exist for one chunk of positions at a time, never for a whole batch. Both models must
         share the tokenizer: the distributions are over one vocabulary.
sequence The teacher answers the task's training prompts through the inference engine; answers the
         task's reward marks correct are kept (DeepSeek-R1's rejection sampling) and the student is
         fine-tuned on them. Only text passes between them, so their tokenizers may differ.

The student is a model directory, or a fresh model from a preset or config.json that takes the teacher's
tokenizer. Everything else (schedule, checkpoints, resume, metrics, accuracy before/after) is SFT's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import load_pretrained
from ..config import ModelConfig
from ..data import tokenizer_fingerprint
from ..durable import atomic_write_text, mkdir
from ..model import DeepSeekModel, build_model
from ..tasks import CORRECT
from ..tasks.evaluate import prompt_ids
from ..tokenizer import Tokenizer, load_tokenizer
from .config import DistillConfig
from .data import DataError, Record, SFTData, build_sft_data, read_jsonl, task_records
from .losses import chunked_kl
from .sft import ModelHook, Objective, SFTTrainer, engine_dtype, run

TEACHER_DATA = "teacher_data.jsonl"


class DistillTrainer(SFTTrainer):
    cfg: DistillConfig

    def __init__(self, cfg: DistillConfig, resume: bool = False, model_hook: ModelHook | None = None):
        self.teacher: DeepSeekModel | None = None
        super().__init__(cfg, resume, model_hook)
        if cfg.mode == "logit":
            teacher_vocab = ModelConfig.from_json(Path(cfg.teacher) / "config.json").vocab_size
            if teacher_vocab != self.model.config.vocab_size:
                raise ValueError(f"the teacher's vocab_size is {teacher_vocab} and the student's "
                                 f"{self.model.config.vocab_size}: logit distillation compares distributions over one "
                                 "vocabulary; build the student with the teacher's vocab_size, or use --mode sequence")
        if cfg.mode == "logit" and cfg.kd_weight > 0:  # at weight 0 the run is SFT on the data: no teacher needed
            self.teacher = load_pretrained(cfg.teacher, device=cfg.device, dtype=engine_dtype(cfg.device),
                                           load_mtp=False).eval()
            self.teacher.requires_grad_(False)

    def load_tokenizer(self) -> Tokenizer:
        cfg = self.cfg
        if not (Path(cfg.teacher) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"the teacher {cfg.teacher!r} has no tokenizer.json")
        teacher = load_tokenizer(cfg.teacher)
        if cfg.model is None:  # a fresh student speaks the teacher's tokens
            return teacher
        student = super().load_tokenizer()
        if cfg.mode == "logit" and tokenizer_fingerprint(student) != tokenizer_fingerprint(teacher):
            raise ValueError(f"the student's tokenizer ({cfg.model}, {student.vocab_size} tokens) differs from the "
                             f"teacher's ({cfg.teacher}, {teacher.vocab_size} tokens); logit distillation needs one "
                             "vocabulary. Use a student with the teacher's tokenizer, or --mode sequence (text only)")
        return student

    def initial_model(self) -> DeepSeekModel:
        if self.cfg.model is not None:
            return super().initial_model()
        return build_model(self.cfg.base_model_config(), device=self.device, dtype=torch.float32, seed=self.cfg.seed)

    def objective(self, batch, hidden: torch.Tensor) -> Objective:
        ce = self.cross_entropy(batch, hidden)
        if self.teacher is None:
            return Objective(ce, {"ce": ce})
        cfg = self.cfg
        with torch.no_grad():
            teacher_hidden = self.teacher.hidden_states(batch.x)[batch.target]  # (N, d_teacher)
        kd = chunked_kl(hidden[batch.target], self.model.lm_head.weight, teacher_hidden, self.teacher.lm_head.weight,
                        cfg.temperature, cfg.kl, cfg.kl_mix, cfg.kd_chunk)
        return Objective((1 - cfg.kd_weight) * ce + cfg.kd_weight * kd, {"ce": ce, "kd": kd})

    def build_data(self) -> SFTData:
        cfg = self.cfg
        if cfg.mode == "logit":
            return super().build_data()
        path = Path(cfg.out) / TEACHER_DATA
        notes = []
        if path.is_file():  # written whole, atomically: a resumed run trains on the same answers
            train, _ = read_jsonl(path)
            notes.append(f"teacher answers read from {path}")
        else:
            train, note = self.teacher_records()
            mkdir(path.parent)
            atomic_write_text(path, "".join(json.dumps(r.data) + "\n" for r in train))
            notes.append(f"{note}; written to {path}")
        _, val = task_records(self.task, 0, cfg.val_examples, cfg.seed)
        return build_sft_data(self.tokenizer, cfg.seq_len, train, val, notes)

    def teacher_records(self) -> tuple[list[Record], str]:
        """The teacher's answers to task_examples training prompts, those its reward marks correct (all with
        keep_incorrect), as chat records."""
        from ..engine.llm import LLM
        from ..engine.sequence import SamplingParams

        cfg = self.cfg
        llm = LLM(cfg.teacher, device=cfg.device, dtype=engine_dtype(cfg.device))
        problems = self.task.problems("train", cfg.task_examples, cfg.seed)
        params = SamplingParams(temperature=cfg.teacher_temperature, max_tokens=cfg.max_new_tokens, seed=cfg.seed)
        outs = llm.generate([prompt_ids(llm.tokenizer, p) for p in problems], params)
        records, correct = [], 0
        for i, (p, o) in enumerate(zip(problems, outs)):
            ok = self.task.reward(p.question, o.text) == CORRECT
            correct += ok
            if ok or cfg.keep_incorrect:
                records.append(Record({"messages": p.messages() + [{"role": "assistant", "content": o.text}]},
                                      f"teacher answer {i}"))
        if not records:
            raise DataError(f"the teacher answered none of {len(problems)} prompts correctly, so there is nothing "
                            "to distil; use a stronger teacher or --keep-incorrect")
        return records, (f"the teacher answered {len(problems)} prompts, {correct} correctly "
                         f"({correct / len(problems):.1%}); kept {len(records)}")


def distill(cfg: DistillConfig, resume: bool = False, model_hook: ModelHook | None = None, echo=print) -> dict:
    """`deepmoe distill` (cfg resolved by posttrain.config.resolve)."""
    return run(DistillTrainer(cfg, resume, model_hook), echo)
