"""Training: run configs, checkpoints and the Accelerate trainer."""
