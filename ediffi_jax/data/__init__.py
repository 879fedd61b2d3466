"""Datasets: built-in and real, ArrayRecord writing, grain pipelines."""
