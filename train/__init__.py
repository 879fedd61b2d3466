"""Training: trainer, expert branching, embedding precompute."""
