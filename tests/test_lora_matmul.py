"""ops.lora.lora_matmul (the fp32 LoRA linear as one matmul, custom VJP) against autodiff of the unmerged
form ``x @ W + s·(x @ A) @ B``: outputs and the gradients w.r.t. x, W, A and B."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.ops.lora import lora_matmul


def test_lora_matmul_values_and_gradients_equal_the_unmerged_form():
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (2, 7, 12))
    w, a, b = (jax.random.normal(k[1], (12, 10)), jax.random.normal(k[2], (12, 3)), jax.random.normal(k[3], (3, 10)))
    probe = jax.random.normal(k[4], (2, 7, 10))
    s = 1.7

    def reference(x, w, a, b):
        return x @ w + s * ((x @ a) @ b)

    np.testing.assert_allclose(lora_matmul(x, w, a, b, s), reference(x, w, a, b), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda *p: jnp.sum(jnp.sin(f(*p)) * probe)  # noqa: E731
    want = jax.grad(loss(reference), argnums=(0, 1, 2, 3))(x, w, a, b)
    got = jax.jit(jax.grad(loss(lambda x, w, a, b: lora_matmul(x, w, a, b, s)), argnums=(0, 1, 2, 3)))(x, w, a, b)
    for name, g, r in zip("xWAB", got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=name)
        assert float(jnp.abs(r).max()) > 0.1
