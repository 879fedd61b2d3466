"""ScaleCrafter: sampling past the training resolution without repeated objects."""
