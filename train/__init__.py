"""Training command lines (python -m train, train.branch, train.export, train.ensemble,
train.precompute): they parse arguments and call ediffi_jax.training / ediffi_jax.runs."""
