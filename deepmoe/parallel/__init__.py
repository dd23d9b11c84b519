"""Parallelism: spreading one model's training over many GPUs (pipeline, expert and data parallel)."""
