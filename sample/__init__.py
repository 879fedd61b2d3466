"""Sampling command lines (python -m sample, sample.evaluate): they parse arguments, call
ediffi_jax.pipeline and write PNGs and grids."""
