"""Pretraining: the recipe, the loop, checkpoints and metrics."""
