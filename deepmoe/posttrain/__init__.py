"""Post-training: supervised fine-tuning (sft), distillation (distill) and their data and objectives,
built from deepmoe.train's loop pieces."""
