"""Evaluation: FID with a JAX port of the FID Inception-v3 (fid.py, inception.py)."""
