"""Encoders: deterministic word embeddings for built-in data (real T5/CLIP arrive with the encoder issue)."""
