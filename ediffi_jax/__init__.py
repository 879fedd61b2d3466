"""ediffi-jax: eDiff-I (ensembles of expert denoisers) with ScaleCrafter high-resolution sampling,
in JAX/Flax."""
