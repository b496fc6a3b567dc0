"""Helpers shared by the adapter tests against PEFT (tests/test_adapters.py, tests/test_adapters_more.py): compiled
forwards, one SGD step through jaxprune's train step (recording its gradient) and the same step in torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprune.partition import partition
from jaxprune.train import make_train_step

_COMPILED: dict = {}


def compiled_once(fn):
    """``fn(graphdef, *arrays)`` jitted with ``graphdef`` static, compiled once per graphdef and argument
    shapes / shardings for the whole test session, at XLA's backend optimisation level 0 (compiles ~2x faster; the
    tests compare numbers, all float32)."""
    jitted = jax.jit(fn, static_argnums=0)

    def call(graphdef, *args):
        key = (fn, graphdef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in jax.tree.leaves(args)),
               jax.tree.structure(args))
        if key not in _COMPILED:
            _COMPILED[key] = jitted.lower(graphdef, *args).compile({"xla_backend_optimization_level": 0})
        return _COMPILED[key](*args)
    return call


@compiled_once
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def logits(model, tokens) -> np.ndarray:
    """The model's logits (compiled once per model structure)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(tokens, jnp.int32)))


def record_gradient() -> optax.GradientTransformation:
    """A pass-through transformation whose state is the gradient it last saw (the train step's own gradient)."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda updates, state, params=None: (updates, updates))


def pure_leaf(tree, name: str, leaf: str) -> np.ndarray:
    """``tree["layers"][i][block][linear][leaf]`` of a pure dict, for the dotted linear path ``name``, as float64."""
    _, i, block, lin = name.split(".")
    return np.asarray(tree["layers"][int(i)][block][lin][leaf], np.float64)


def sgd_step(model, tokens, lr: float):
    """One SGD(lr) step through the train step every run uses (the loss and gradient of every run):
    (new trainable, its gradient as a pure dict, loss, graphdef, frozen, masks)."""
    graphdef, frozen, trainable, masks = partition(model)
    sgd = optax.chain(record_gradient(), optax.sgd(lr))
    args = (trainable, sgd.init(trainable), (), frozen, masks, jnp.asarray(tokens[None], jnp.int32), 0)
    step = make_train_step(graphdef, sgd, donate=False).lower(*args).compile({"xla_backend_optimization_level": 0})
    new, opt_state, _, metrics = step(*args)
    return new, nnx.to_pure_dict(opt_state[0]), float(metrics["loss"]), graphdef, frozen, masks


def torch_sgd_step(pm, tokens, lr: float):
    """PEFT's model takes one SGD(lr) step on the same tokens: (its trainable parameters by name, loss)."""
    import torch

    pm.train()
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(list(params.values()), lr=lr)
    loss = pm(input_ids=torch.as_tensor(tokens), labels=torch.as_tensor(tokens)).loss
    loss.backward()
    opt.step()
    pm.eval()
    return params, loss.item()
