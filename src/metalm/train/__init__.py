"""Training: the one loop, optimisers and schedules, checkpoints, logging, evaluation."""
