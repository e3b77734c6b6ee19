"""Training infrastructure: optimizer, train state, checkpoints, device mesh."""
