"""`jaxprune prune`: flags -> ``prune.pipeline`` (structured: a criterion, LoRA recovery, physical shrink),
``prune.depth_pipeline`` (whole layers go) or ``prune.elementwise_pipeline`` (element masks). The methods and
their own flags come from the registry (``prune.registry``), plugins included (``--plugin``).

    RUN_DIR/ run.json, checkpoints/, metrics.jsonl, loss.png   (as finetune)
             prune.json   method, ratio, parameter counts, fraction removed, per-layer widths
             model/       the shrunk model (jaxprune checkpoint, LoRA merged)
    element-wise methods (--sparsity / --pattern):  OUT is a checkpoint with element masks
"""

from __future__ import annotations

import argparse
import sys

from ..adapters import ADAPTERS
from ..errors import UserError
from ..prune.depth_pipeline import DepthPruneConfig, prune_depth
from ..prune.elementwise_pipeline import ElementwisePruneConfig, prune_elementwise
from ..prune.groups import ATTN_UNITS, WIDTHS
from ..prune.pipeline import DEFAULT_METHOD, StructuredPruneConfig, prune_structured
from ..prune.registry import DEPTH, ELEMENTWISE, STRUCTURED
from .common import add_distill_args, add_run_args, cli_dests, mesh_config, run_record, train_config, with_config
from .flags import FRACTION_BELOW_1, NONNEG_INT, POSITIVE_INT, SEQ_LEN
from .method_flags import add_options_group, foreign_option, options_from_args

OWNERS: dict[str, set[str]] = {}  # option dest -> the methods that take it (filled with the parser)


def add_prune_parser(sub) -> None:
    structured, elementwise, depth = STRUCTURED.names(), ELEMENTWISE.names(), DEPTH.names()
    names = (*structured, *elementwise, *depth)
    if len(set(names)) < len(names):
        clash = sorted(n for n in set(names) if names.count(n) > 1)[0]
        raise UserError(f"method name {clash!r} is registered twice (structured, element-wise or depth)")
    p = sub.add_parser("prune", help="structured (+ LoRA recovery, shrink), depth or element-wise pruning",
                       description="methods: " + "; ".join(f"{m.name}: {m.summary}" for m in [*STRUCTURED,
                                                                                               *ELEMENTWISE, *DEPTH]))
    p.add_argument("model")
    add_run_args(p, steps=200, frozen_base=True)
    p.add_argument("--method", choices=names, default=DEFAULT_METHOD,
                   help=f"structured: {', '.join(structured)}; element-wise (--sparsity/--pattern): "
                        f"{', '.join(elementwise)}; depth (whole layers): {', '.join(depth)}")
    p.add_argument("--plugin", action="append", default=None, metavar="FILE_OR_MODULE",
                   help="import a .py file or module that registers more methods (repeatable; see README "
                        "'Adding a method')")
    g = p.add_argument_group("structured criteria")
    g.add_argument("--ratio", type=FRACTION_BELOW_1, default=0.5,
                   help=f"per-layer fraction of units pruned; depth methods ({', '.join(depth)}): the fraction of "
                        "decoder layers removed, round(ratio·L)")
    g.add_argument("--attn-unit", choices=ATTN_UNITS, default="auto",
                   help="a whole KV group, or query heads (same count per group); auto: kv_group unless a layer "
                        "has a single KV head (MQA), then q_head")
    own = ", ".join(f"{m.name}: {m.default_widths}" for m in STRUCTURED if m.default_widths)
    g.add_argument("--widths", choices=WIDTHS, default=None,
                   help=f"default: the method's own ({own}; the others: layerwise). 'layerwise' "
                        "prunes --ratio of the units of each layer not in --exclude-layers (the papers' protocol; "
                        "for LoRAPrune 5x lower perplexity than uniform at ratio 0.5 on SmolLM2); `export` writes it "
                        "as --format gguf (llama.cpp runs it), --format vllm or --pad. "
                        "'uniform' prunes every layer to the same widths, so `export` writes a stock transformers "
                        "model. 'global' (one-shot criteria): scores z-scored per layer and module, one threshold "
                        "removes --ratio of the decoder linears' parameters, widths follow (FLAP's AL-AM). "
                        "'incremental' (one-shot criteria): every layer, at ratios rising as ln(1 + depth) with mean "
                        "--ratio (SlimGPT's Incremental Pruning Ratio)")
    g.add_argument("--exclude-layers", default="default",
                   help="comma-separated layer indices never pruned, 'none', or 'default' (structured with "
                        "--widths layerwise: layers < int(0.1·L) and the last one; element-wise: none)")
    g.add_argument("--recover-steps", type=NONNEG_INT, default=None,
                   help="one-shot criteria, depth methods (and loraprune with --select-steps): LoRA recovery steps "
                        "(default: --steps; 0: no recovery, the pruned base as it is)")
    g.add_argument("--recover-adapter", choices=ADAPTERS.names(), default="lora",
                   help="what the recovery run trains on the pruned, frozen base (structured and depth methods; "
                        "--lora-rank / --lora-alpha / --targets as in `finetune --adapter`): "
                        + ", ".join(ADAPTERS.names()) + ". The recovery stage only: LoRAPrune's importance stays "
                        "LoRA-guided (its --select-steps run trains LoRA; without --select-steps it prunes and "
                        "recovers in one LoRA run, and only lora is accepted)")
    g = p.add_argument_group("calibration (criteria and methods that read activations or gradients)")
    g.add_argument("--calib", default=None, help="element-wise: calibration text (.txt or dir; default: --text)")
    g.add_argument("--calib-samples", type=POSITIVE_INT, default=80,
                   help="calibration sequences (80 x 128 tokens: what every benchmark row used; at 10 x 64 SlimGPT's "
                        "retraining-free perplexity on SmolLM2 is 2.8x worse, FLAP's 1.2x)")
    g.add_argument("--calib-len", type=SEQ_LEN, default=128,
                   help="calibration sequence length (capped at --seq-len)")
    g.add_argument("--calib-batch", type=POSITIVE_INT, default=8, help="calibration sequences per jitted pass")
    g = p.add_argument_group("element-wise methods")
    g.add_argument("--sparsity", type=FRACTION_BELOW_1, default=None,
                   help="fraction of every decoder linear's weights set to zero (N:M patterns imply it)")
    g.add_argument("--pattern", default=None,
                   help="'unstructured' (default), N:M e.g. 2:4, 4:8 (N kept of M), or block:BxB")
    OWNERS.clear()
    for m in [*STRUCTURED, *ELEMENTWISE, *DEPTH]:
        if m.options is not None:
            add_options_group(p, f"{m.name} options", m.options, OWNERS, m.name)
    add_distill_args(p, "structured methods: recover (and, for LoRAPrune, prune) on (1-a)·CE + a·T²·KL to the "
                        "unpruned model, computed in the same step from the frozen base (Minitron); element-wise "
                        "models distil in `finetune --keep-sparsity --distill`")
    p.set_defaults(fn=with_config(cmd_prune, p), parser=p)


def cmd_prune(args: argparse.Namespace) -> dict:
    given = cli_dests(args.parser, args.argv) if hasattr(args, "argv") else set()
    foreign = foreign_option(OWNERS, given, args.method)
    if foreign:
        raise UserError(f"{foreign}, not of --method {args.method}")
    if args.method in ELEMENTWISE:
        if args.recover_adapter != "lora":
            raise UserError(f"--recover-adapter {args.recover_adapter}: element-wise pruning writes a checkpoint "
                            "without recovery; recover it with `jaxprune finetune CKPT --keep-sparsity --adapter "
                            f"{args.recover_adapter}`")
        return cmd_prune_elementwise(args)
    if args.sparsity is not None or args.pattern is not None:
        raise UserError(f"--sparsity / --pattern apply to the element-wise methods ({', '.join(ELEMENTWISE.names())})"
                        f", not --method {args.method}")
    if args.method in DEPTH:
        return cmd_prune_depth(args, given)
    criterion = STRUCTURED.get(args.method)
    if args.quantize_base != "none" and "base_gradients" in criterion.needs:
        raise UserError(f"--quantize-base {args.quantize_base}: --method {args.method} reads base-weight gradients "
                        "(use --method loraprune, which never differentiates the base)")
    prune = StructuredPruneConfig(method=args.method, ratio=args.ratio, attn_unit=args.attn_unit, widths=args.widths,
                                  exclude_layers=args.exclude_layers, calib_samples=args.calib_samples,
                                  calib_len=args.calib_len, calib_batch=args.calib_batch,
                                  recover_steps=args.recover_steps, recover_adapter=args.recover_adapter,
                                  options=options_from_args(criterion.options, args))
    summary = prune_structured(args.model, prune, train_config(args), mesh_config(args),
                               record=run_record(args, "prune"))
    if not args.json:
        print(f"pruned {args.method} ratio {args.ratio}: {summary['params_before']:,} -> "
              f"{summary['params_after']:,} parameters ({100 * summary['params_removed_fraction']:.1f}% of all "
              f"removed); model in {summary['model_dir']}", file=sys.stderr)
    return {k: v for k, v in summary.items() if k != "widths"}


def cmd_prune_depth(args, given: set[str]) -> dict:
    """`jaxprune prune MODEL --method {shortgpt,replaceme} --ratio R --text FILE --out RUN_DIR`: whole layers."""
    for flag in sorted(given & {"attn_unit", "widths", "exclude_layers"}):
        raise UserError(f"--{flag.replace('_', '-')} is for structured criteria; --method {args.method} removes layers")
    prune = DepthPruneConfig(method=args.method, ratio=args.ratio, calib_samples=args.calib_samples,
                             calib_len=args.calib_len, calib_batch=args.calib_batch, recover_steps=args.recover_steps,
                             recover_adapter=args.recover_adapter,
                             options=options_from_args(DEPTH.get(args.method).options, args))
    s = prune_depth(args.model, prune, train_config(args), mesh_config(args), record=run_record(args, "prune"))
    if not args.json:
        print(f"pruned {args.method}: layers {s['layers_removed']} of {s['layers_before']} removed, "
              f"{s['params_before']:,} -> {s['params_after']:,} parameters; model in {s['model_dir']}", file=sys.stderr)
    return s


def cmd_prune_elementwise(args) -> dict:
    """`jaxprune prune MODEL --method {magnitude,wanda,sparsegpt,...} --sparsity S --pattern P --out CKPT`."""
    if args.quantize_base != "none":
        raise UserError(f"--quantize-base {args.quantize_base}: element-wise pruning rewrites the base weights")
    if args.distill:
        raise UserError("--distill: element-wise pruning writes a checkpoint without recovery; recover it with "
                        "`jaxprune finetune CKPT --keep-sparsity --distill --text FILE --out RUN_DIR`")
    if args.sparsity is None and args.pattern is None:
        raise UserError(f"--method {args.method} is element-wise: give --sparsity S and/or --pattern N:M (the "
                        f"structured criteria are {', '.join(STRUCTURED.names())})")
    if not args.out:
        raise UserError("--out DIR is required")
    method = ELEMENTWISE.get(args.method)
    exclude = None if args.exclude_layers in (None, "default") else args.exclude_layers
    cfg = ElementwisePruneConfig(method=args.method, sparsity=args.sparsity, pattern=args.pattern,
                                 calib_samples=args.calib_samples, calib_len=args.calib_len,
                                 calib_batch=args.calib_batch, exclude_layers=exclude, seed=args.seed,
                                 dtype=args.dtype, progress=args.progress,
                                 options=options_from_args(method.options, args))
    calib = args.calib or args.text
    if method.needs_calibration and not calib:
        raise UserError(f"--method {args.method} needs calibration text: --calib FILE (or --text)")
    summary = prune_elementwise(args.model, cfg, args.out, calib_text=calib, overwrite=args.overwrite)
    if not args.json:
        excl = summary["excluded_layers"]
        print(f"pruned {args.method} {summary['pattern']} sparsity {summary['sparsity']:g}: "
              f"{100 * summary['sparsity_measured']:.2f}% of decoder linear weights are zero"
              f"{f' (layers {excl} excluded, kept dense)' if excl else ''}; model in {args.out}", file=sys.stderr)
    return summary
