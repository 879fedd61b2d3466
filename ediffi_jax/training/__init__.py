"""Training: the train step, the trainer loop, resume rules, the workdir lock, logs, the dry run."""
