"""Native checkpoints: an orbax checkpoint of the weights plus our config JSON.

    CKPT/
      jaxprune.json   format tag, ModelConfig, dtype, LoRA layout, weight-masked layers
      params/         orbax checkpoint of every Variable (base, LoRA factors, masks)
      tokenizer files (when the model came with a tokenizer)

Writes are atomic: everything goes to a temp dir next to CKPT, renamed at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .config import ModelConfig
from .errors import UserError
from .fileio import check_output_dir, replace_dir
from .model import LlamaForCausalLM
from .weights import lora_spec, model_arrays, model_from_arrays, weight_mask_paths

FORMAT = "jaxprune-checkpoint"
META = "jaxprune.json"


def nest(flat: dict[tuple, object]) -> dict:
    """{('layers', 0, 'mlp'): x} -> {'layers': {'0': {'mlp': x}}} (string keys, orbax-friendly)."""
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(str(k), {})
        d[str(path[-1])] = v
    return out


def unnest(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        key = prefix + (int(k) if k.isdigit() else k,)
        if isinstance(v, dict):
            out.update(unnest(v, key))
        else:
            out[key] = v
    return out


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """Model checkpoints hold host-local arrays: the calling process reads / writes them alone
    (under jax.distributed, orbax would otherwise wait for every process)."""
    return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                              active_processes={jax.process_index()})


def save_pytree(directory: Path, tree) -> None:
    """Save a pytree of host-local arrays with orbax (blocking)."""
    tree = jax.tree.map(np.asarray, tree)  # orbax refuses single-device jax arrays under jax.distributed
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:
        ckptr.save(Path(directory).absolute(), tree)


def restore_pytree(directory: Path, abstract=None):
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:
        return ckptr.restore(Path(directory).absolute(), abstract)


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / META).exists()


def save_model(model: LlamaForCausalLM, out_dir: Path, *, tokenizer=None, overwrite: bool = False,
               extra_meta: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        meta = {"format": FORMAT, "version": 1, "config": model.config.to_dict(),
                "dtype": str(model.dtype), "lora": lora_spec(model), "weight_masks": weight_mask_paths(model)}
        meta.update(extra_meta or {})
        save_pytree(tmp / "params", nest(model_arrays(model)))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=2))  # written last: marks the dir complete
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_meta(path: Path) -> dict:
    meta = json.loads((Path(path) / META).read_text())
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: {META} is not a jaxprune checkpoint (format={meta.get('format')!r})")
    return meta


def load_model(path: Path, dtype=None) -> LlamaForCausalLM:
    """Restore a native checkpoint; ``dtype`` casts the float weights (default: as saved)."""
    path = Path(path)
    meta = read_meta(path)
    cfg = ModelConfig.from_dict(meta["config"])
    try:
        tree = restore_pytree(path / "params")
    except Exception as e:  # orbax raises many types for a damaged checkpoint
        raise UserError(f"{path}: cannot restore weights ({str(e).splitlines()[0]})") from None
    arrays = {p: np.asarray(v) for p, v in unnest(tree).items()}
    dtype = jnp.dtype(dtype or meta["dtype"])
    return model_from_arrays(cfg, arrays, dtype=dtype, lora=meta.get("lora"),
                             weight_masks=meta.get("weight_masks"), source=str(path))
