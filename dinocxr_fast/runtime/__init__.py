"""Run-time plumbing shared by every training job: checkpoints, metrics, distributed setup."""
