"""The kernel census of benchmarks/train_step_anatomy.py on a program of known make-up."""
import jax
import jax.numpy as jnp

from benchmarks.train_step_anatomy import census


def test_census_counts_the_kernels_of_a_known_program():
    def f(x, w, m):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(y).reshape(2, -1) @ m, jnp.sum(jnp.exp(x))

    args = (jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4)), jnp.ones((256, 5)))
    c = census(jax.jit(f).lower(*args).compile().as_text())
    # conv -> tanh (elementwise) -> dot, and exp -> sum (a reduction); parameters are no kernels
    assert c["kernels"] == {"convolution": 1, "elementwise": 1, "dot": 1, "reduce": 1}, c
    assert c["ops"]["parameter"] == 3
