"""Training: typed configs, AdamWScale, schedules, the one training loop, checkpoints."""
