"""Sampling: load an expert ensemble from training runs, generate, write PNGs and grids."""
