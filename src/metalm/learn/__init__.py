"""Learning: task samplers and algorithms that write gradients (the loop applies them)."""
