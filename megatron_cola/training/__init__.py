"""Pre-training on DeepSpeed: arguments, engine, train loop, checkpoints, logging."""
