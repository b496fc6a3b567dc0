"""Element-wise pruning runs: a registered element-wise method (magnitude, Wanda, SparseGPT, plugins) over every
decoder linear, unstructured, N:M or blocks, written as a checkpoint with its masks.

The Python API behind ``jaxprune prune --sparsity / --pattern``::

    from jaxprune.prune.elementwise_pipeline import ElementwisePruneConfig, prune_elementwise

    summary = prune_elementwise("path/to/model", ElementwisePruneConfig(method="wanda", sparsity=0.5),
                                out="pruned_ckpt", calib_text="calib.txt")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checkpoint, load
from ..errors import UserError
from ..fileio import check_output_dir
from ..weights import linears, merge_lora
from . import wanda
from .posttraining import calibration_tokens, posttraining_layers, prune_model
from .registry import ELEMENTWISE, method_options
from .select import parse_pattern, resolve_sparsity


@dataclass(frozen=True)
class ElementwisePruneConfig:
    """``sparsity``: fraction of each decoder linear's weights set to zero (implied by an N:M ``pattern``);
    ``pattern``: 'unstructured' (None), 'N:M' or 'block:BxB'; ``exclude_layers``: comma-separated indices kept
    dense (None: none); ``options``: the method's options dataclass (None: its defaults)."""
    method: str = wanda.NAME
    sparsity: float | None = None
    pattern: str | None = None
    calib_samples: int = 80
    calib_len: int = 128
    calib_batch: int = 8
    exclude_layers: str | None = None
    seed: int = 0
    dtype: str | None = None
    progress: bool = True
    options: Any = None

    def method_options(self):
        return method_options(ELEMENTWISE.get(self.method), self.options, "ElementwisePruneConfig")


def prune_elementwise(model_path, cfg: ElementwisePruneConfig, out, *, calib_text=None,
                      overwrite: bool = False) -> dict:
    """Prune ``model_path`` element-wise into the checkpoint ``out`` (masks in the masks pytree, pruned weights
    zero); ``calib_text``: calibration text for methods that read activations. Returns the summary."""
    method = ELEMENTWISE.get(cfg.method)
    opts = cfg.method_options()
    nm = parse_pattern(cfg.pattern)
    sparsity = resolve_sparsity(cfg.sparsity, nm)
    out = Path(out)
    check_output_dir(out, overwrite)
    if method.needs_calibration and not calib_text:
        raise UserError(f"{cfg.method} needs calibration text (ElementwisePruneConfig: calib_text)")
    model = load.load_model(model_path, cfg.dtype)
    layers = posttraining_layers(model.config.num_layers, cfg.exclude_layers)
    if any(l.has_lora for _, l in linears(model)):
        model = merge_lora(model)
    tok = load.load_tokenizer(model_path, required=method.needs_calibration)
    calib = None
    if method.needs_calibration:
        calib = calibration_tokens(calib_text, tok, cfg.calib_samples, cfg.calib_len, cfg.seed)
    extra = dataclasses.asdict(opts) if opts is not None else {}
    report = prune_model(model, calib, method=cfg.method, sparsity=sparsity, nm=nm, batch_size=cfg.calib_batch,
                         progress=cfg.progress, layers=layers, **extra)
    meta = {"pruned_from": str(Path(model_path).resolve()), "method": cfg.method, "sparsity": sparsity,
            "pattern": report["pattern"], "excluded_layers": report["excluded_layers"]}
    checkpoint.save_model(model, out, tokenizer=tok, overwrite=overwrite, extra_meta=meta)
    return {**meta, "model_dir": str(out), "sparsity_measured": report["sparsity_measured"],
            "seconds": report["seconds"], "damp_retries": report["damp_retries"],
            "calib_tokens": 0 if calib is None else int(calib.size)}
