"""`jaxprune lm-eval MODEL --tasks T1,T2`: zero- / few-shot accuracy with EleutherAI's lm-evaluation-harness."""

from __future__ import annotations

import time
from pathlib import Path

from .. import load
from ..fileio import write_json_atomic
from ..lm_eval_model import LM_EVAL_VERSION, make_lm
from ..errors import UserError
from ..lm_eval_tasks import (ensure_offline_if_unreachable, evaluate, find_tasks, load_tasks, metrics, per_request,
                             require_lm_eval, table)
from ..sharding import init_distributed, is_main_process, placement_for
from ..weights import set_linear_impl
from .common import add_impl_arg, add_mesh_args, add_model_args, mesh_config
from .flags import NONNEG_INT, POSITIVE_INT, SEED, SEQ_LEN


def cmd_lm_eval(a) -> dict:
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks: give at least one task name")
    if a.output and not Path(a.output).parent.exists():
        raise UserError(f"--output {a.output}: parent directory does not exist")
    version = require_lm_eval(LM_EVAL_VERSION)
    offline = ensure_offline_if_unreachable()
    mc = mesh_config(a)
    init_distributed(mc)
    tm, names = find_tasks(names, a.include_path)
    tasks = load_tasks(tm, names, offline)  # bad tasks fail before the model loads
    model = load.load_model(a.model, a.dtype)
    placement = placement_for(mc, (1, a.batch_size, 2), model.config.head_dim)
    impl = set_linear_impl(model, a.impl, inference=True, mesh=placement.kernel_mesh())
    lm = make_lm(model, load.load_tokenizer(a.model), batch_size=a.batch_size, max_length=a.max_length,
                 max_gen_toks=a.max_gen_toks, placement=placement, progress=not a.json, seed=a.seed)
    t = time.perf_counter()
    results = evaluate(lm, tasks, tm, num_fewshot=a.num_fewshot, limit=a.limit, bootstrap_iters=a.bootstrap_iters,
                       seed=a.seed)
    out = {"model": str(a.model), "tasks": metrics(results), "num_fewshot": a.num_fewshot, "limit": a.limit,
           "batch_size": a.batch_size, "max_length": lm.max_length, "buckets": sorted(lm.scorer.buckets),
           "seconds": time.perf_counter() - t, "offline": offline, "impl": impl, "lm_eval": version}
    if a.output and is_main_process():
        write_json_atomic(a.output, {**out, "n-samples": results.get("n-samples"), "versions": results.get("versions"),
                                     "per_request": per_request(results)})
    if not a.json:
        print(table(results))
    return out


def add_lm_eval_parser(sub) -> None:
    p = sub.add_parser("lm-eval", help="zero-shot accuracy with lm-evaluation-harness (see README: lm-eval)")
    p.add_argument("model")
    p.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval task / group / tag names or globs, e.g. 'shakespeare' (local) or "
                        "'boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa' (need the hub)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a folder of lm-eval task YAML files (repeatable); jaxprune/lm_tasks is always included")
    p.add_argument("--num-fewshot", type=NONNEG_INT, default=None, help="default: each task's own (0 for most)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="only the first N documents of each task")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="rows per forward (requests are padded)")
    p.add_argument("--max-length", type=SEQ_LEN, default=None,
                   help="longest scored sequence; longer ones lose their start (default: max_position_embeddings)")
    p.add_argument("--max-gen-toks", type=POSITIVE_INT, default=256, help="generation tasks' default token budget")
    p.add_argument("--bootstrap-iters", type=NONNEG_INT, default=1000,
                   help="bootstrap resamples for the stderr of non-mean metrics (0: none)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--output", default=None, help="also write the metrics and every request's answer to this JSON")
    add_model_args(p)
    add_impl_arg(p)
    add_mesh_args(p)
    p.set_defaults(fn=cmd_lm_eval)
