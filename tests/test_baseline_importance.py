"""The baselines' unit scores against an independent reference: torch autograd on the transformers model and
a numpy port of LLM-Pruner's grouping, written in torch's [out, in] layout (none of our reduction code).

LLM-Pruner (horseee/LLM-Pruner, ``taylor`` importance, ``param_first``, group reduction "sum"): the score
of a unit is ``Σ |w · ∂L/∂w|`` over every weight coupled to it; magnitude (its ``l2`` importance) is
``sqrt(Σ w²)`` over the same weights. Coupled weights, torch layout:

* attention, ``kv_group`` j: rows of the q heads of group j in ``q_proj``, the rows of KV head j in
  ``k_proj`` and ``v_proj``, the columns of those q heads in ``o_proj``;
  ``q_head`` h: the rows of head h in ``q_proj`` and its columns in ``o_proj``;
* MLP channel c: row c of ``gate_proj`` and ``up_proj``, column c of ``down_proj``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

from conftest import make_hf_llama
from jaxprune import load
from jaxprune.partition import partition
from jaxprune.prune.importance import magnitude_importance
from jaxprune.prune.llm_pruner import taylor_importance_step

H, KV, D = 4, 2, 16


def torch_params_and_grads(model, tokens):
    model.zero_grad()
    loss = model(torch.as_tensor(tokens), labels=torch.as_tensor(tokens)).loss
    loss.backward()
    params = {n: p.detach().double().numpy() for n, p in model.named_parameters()}
    grads = {n: p.grad.double().numpy() for n, p in model.named_parameters()}
    return params, grads


def reference_scores(elem, num_layers: int, unit: str):
    """Per-layer (attention, MLP) unit scores from ``elem(name) -> element scores [out, in]`` (torch names)."""
    attn, mlp = [], []
    for i in range(num_layers):
        p = f"model.layers.{i}."
        q, k, v = (elem(p + f"self_attn.{m}_proj.weight") for m in "qkv")
        o = elem(p + "self_attn.o_proj.weight")
        rows = lambda w, head: w[head * D:(head + 1) * D, :].sum()  # noqa: E731
        cols = lambda w, head: w[:, head * D:(head + 1) * D].sum()  # noqa: E731
        if unit == "q_head":
            attn.append(np.array([rows(q, h) + cols(o, h) for h in range(H)]))
        else:
            g = H // KV
            attn.append(np.array([sum(rows(q, h) + cols(o, h) for h in range(j * g, (j + 1) * g))
                                  + rows(k, j) + rows(v, j) for j in range(KV)]))
        gate, up, down = (elem(p + f"mlp.{m}_proj.weight") for m in ("gate", "up", "down"))
        mlp.append(gate.sum(1) + up.sum(1) + down.sum(0))
    return attn, mlp


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_dir, model = make_hf_llama(tmp_path_factory.mktemp("imp"), 3, hidden_size=64, intermediate_size=80,
                                  num_attention_heads=H, num_key_value_heads=KV)
    tokens = np.random.default_rng(0).integers(0, 96, (4, 24))
    return hf_dir, model, tokens


@pytest.mark.parametrize("unit,chunk", [("kv_group", None), ("q_head", None), ("q_head", 3)])
def test_llm_pruner_taylor_scores_equal_torch_autograd_reference(tiny, unit, chunk):
    """chunk=3 on 4 sequences: two accumulated passes of 2 (the batch-mean gradient, as one pass)."""
    hf_dir, model, tokens = tiny
    params, grads = torch_params_and_grads(model, tokens)
    want_attn, want_mlp = reference_scores(lambda n: np.abs(params[n] * grads[n]), 2, unit)

    jmodel = load.load_model(hf_dir)
    graphdef, frozen, trainable, masks = partition(jmodel)
    attn, mlp = taylor_importance_step(graphdef, jmodel.config, unit, chunk)(frozen, trainable, masks, tokens)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(attn[i]), want_attn[i], rtol=2e-4, err_msg=f"attn {i}")
        np.testing.assert_allclose(np.asarray(mlp[i]), want_mlp[i], rtol=2e-4, err_msg=f"mlp {i}")
    # the units of every layer differ by far more than the tolerance, so a permuted unit would fail
    assert all(np.ptp(x) > 5e-3 * x.max() for x in (*want_attn, *want_mlp))


@pytest.mark.parametrize("unit", ["kv_group", "q_head"])
def test_magnitude_scores_equal_the_l2_norm_of_the_coupled_weights(tiny, unit):
    hf_dir, model, _ = tiny
    params = {n: p.detach().double().numpy() for n, p in model.named_parameters()}
    sq_attn, sq_mlp = reference_scores(lambda n: params[n] ** 2, 2, unit)

    jmodel = load.load_model(hf_dir)
    _, frozen, _, _ = partition(jmodel)
    attn, mlp = magnitude_importance(jmodel.config, nnx.to_pure_dict(frozen), unit)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(attn[i]), np.sqrt(sq_attn[i]), rtol=1e-5, err_msg=f"attn {i}")
        np.testing.assert_allclose(np.asarray(mlp[i]), np.sqrt(sq_mlp[i]), rtol=1e-5, err_msg=f"mlp {i}")
