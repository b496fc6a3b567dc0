"""A pretraining run from random init, any registered method: :func:`run_pretrain` of a :class:`PretrainConfig`.

    RUN_DIR/ run.json, checkpoints/, metrics.jsonl, loss.png   (as finetune)
             support/       the frozen arrays (SLTrain supports, LOST channels, SwitchLoRA candidate pools,
                            S-STE scales; orbax), restored on resume
             pretrain.json  method, parameter counts, optimizer-state bytes, final metrics, the method's own keys
             model/         the result as a DENSE jaxprune checkpoint (merged weights), so
                            `jaxprune eval RUN_DIR` and `jaxprune export RUN_DIR OUT` work unchanged

What is method-specific (schedules, train-loop hooks, extra summary keys, whether ``TrainConfig.impl`` applies)
comes from the method's ``registry.PretrainMethod``; ``jaxprune pretrain`` is flags -> this config -> this call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import jax.numpy as jnp

from .. import checkpoint
from ..config import ModelConfig
from ..data import training_blocks
from ..errors import UserError
from ..fileio import write_json_atomic
from ..fixtures import fixture_paths, named_tokenizer_dir
from ..hf import load_tokenizer as hf_tokenizer
from ..load import DTYPES
from ..partition import tree_bytes
from ..runs import TrainConfig, TrainJob, last_metrics, prepare_run_dir, run_training
from ..sharding import MeshConfig, init_distributed, is_main_process, placement_for
from ..weights import set_linear_impl
from .methods import (MethodConfig, build_model, dense_model, make_pretrain_optimizer, param_summary,
                      partition_pretrain)
from .registry import PRETRAIN, RunHooks
from .sltrain import restore_support, save_support
from .slope import SLoPeOptions
from .switchlora import SwitchOptions

#: TrainConfig fields a resumed run may change (left out of the default run.json record).
RESUME_FREE_FIELDS = ("resume", "overwrite", "progress", "quiet", "remat")


@dataclass(frozen=True)
class TinyModelConfig:
    """The random-init LLaMA's shape; the vocabulary and special tokens come from the tokenizer."""

    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # None: hidden_size / num_heads
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise UserError(f"TinyModelConfig.{name} = {getattr(self, name)}: must be >= 1")

    def model_config(self, tokenizer, seq_len: int) -> ModelConfig:
        head_dim = self.head_dim or self.hidden_size // self.num_heads
        return ModelConfig(vocab_size=max(len(tokenizer), tokenizer.vocab_size), hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=head_dim,
                           max_position_embeddings=max(2048, seq_len), rms_norm_eps=1e-5,
                           tie_word_embeddings=bool(self.tie_word_embeddings), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining run. ``run``: data, optimizer, loop, run dir, seed, dtype, impl (``run.lora_*`` are unused:
    the factors are ``method``'s); ``slope`` / ``switch``: those methods' schedule options (read by their
    ``plan`` only); ``tokenizer``: a dir or a cached one by name (None: the SmolLM2 fixture's); ``record``:
    run.json's content (None: these fields, less those a resume may change)."""

    run: TrainConfig
    method: MethodConfig = field(default_factory=MethodConfig)
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    slope: SLoPeOptions = field(default_factory=SLoPeOptions)
    switch: SwitchOptions = field(default_factory=SwitchOptions)
    tokenizer: str | None = None
    record: dict | None = None


def default_record(cfg: PretrainConfig) -> dict:
    """run.json of a config given without ``record``: every field but the mesh and what a resume may change."""
    rec = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("mesh", "record")}
    rec = {k: asdict(v) if is_dataclass(v) else v for k, v in rec.items()}
    rec["run"] = {k: v for k, v in rec["run"].items() if k not in RESUME_FREE_FIELDS}
    return {"kind": "pretrain", **rec}


def load_tokenizer(path):
    """The tokenizer of DIR, or of a cached fixture by name (``smollm2``, ``plays-bpe-4096``)."""
    named = named_tokenizer_dir(path) if path and not Path(path).is_dir() else None
    p = (named or Path(path)) if path else fixture_paths().hf_dir
    if not p.is_dir():
        raise UserError(f"{p}: no such tokenizer dir" + ("" if path and not named else
                        " (run scripts/fixtures.py to build the cached tokenizers, or give a tokenizer dir)"))
    tok = hf_tokenizer(p)
    if tok is None:
        raise UserError(f"{p}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return tok


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Build the method's model, train it (resuming on ``run.resume``), save the dense result; -> the summary
    written to ``pretrain.json``. Bad input raises a UserError before the run dir is touched."""
    run, mc, method = cfg.run, cfg.method, PRETRAIN.get(cfg.method.method)
    init_distributed(cfg.mesh)
    placement = placement_for(cfg.mesh, run.batch_shape)  # a bad mesh or batch fails before anything is written
    hooks = method.plan(mc, cfg) if method.plan is not None else RunHooks()  # the method's schedule checks
    if run.steps < 1:
        raise UserError(f"TrainConfig.steps = {run.steps}: must be >= 1")
    if not run.text:
        raise UserError("TrainConfig.text: the training text is required")
    tok = load_tokenizer(cfg.tokenizer)
    model_cfg = cfg.model.model_config(tok, run.seq_len)
    blocks = training_blocks(run.text, tok, run.seq_len, seed=run.seed)  # on N hosts each tokenizes its share
    model = build_model(model_cfg, mc, seed=run.seed, dtype=DTYPES[run.dtype] if run.dtype else jnp.float32)
    summary = param_summary(model, model_cfg, mc)
    # a static attribute of the graphdef: set before the split
    impl = set_linear_impl(model, run.impl, mesh=placement.kernel_mesh())
    graphdef, frozen, trainable, masks = partition_pretrain(model)
    record = cfg.record if cfg.record is not None else default_record(cfg)
    run_dir, prev = prepare_run_dir(run.out, record, resume=run.resume,
                                    overwrite=run.overwrite)  # after the checks above: bad input leaves no run dir
    if prev is None:
        if is_main_process():
            save_support(run_dir, frozen)
    else:
        frozen = restore_support(run_dir, frozen)

    on_start, callbacks = hooks.job(graphdef, placement) if hooks.job is not None else (None, None)
    job = TrainJob(graphdef, frozen, trainable, masks, blocks, make_pretrain_optimizer(run.optim(), trainable),
                   head_dim=model_cfg.head_dim, callbacks=callbacks, on_start=on_start)
    result = run_training(job, run, placement, run_dir, resume=prev is not None)
    dense = dense_model(result.model)
    if is_main_process():
        checkpoint.save_model(dense, run_dir / "model", tokenizer=tok, overwrite=True,
                              extra_meta={"pretrain_method": mc.method})
    out = {"method": mc.method, "impl": impl if method.uses_impl else None,
           "run_dir": str(run_dir), "model_dir": str(run_dir / "model"), **summary,
           "opt_state_bytes": tree_bytes(result.state.opt_state), **last_metrics(run_dir), **hooks.summary}
    if is_main_process():
        write_json_atomic(run_dir / "pretrain.json", out)
    return out
