"""Regenerate BENCHMARKS.md from every benchmarks/*.json (one section + table per file).

A renderer per file name can shape a table; any other JSON falls back to a generic table:
a list of records -> one row per record, a dict -> key/value rows (nested dicts flattened
with dots). Unreadable files are reported in the document, never fatal.

    python scripts/make_benchmarks_md.py [--dir benchmarks] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune.fileio import write_text_atomic  # noqa: E402


def _cell(v) -> str:
    if isinstance(v, float):
        s = f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    elif isinstance(v, (list, tuple)):
        s = ", ".join(_cell(x) for x in v)
    elif isinstance(v, dict):
        s = json.dumps(v, sort_keys=True)
    elif v is None:
        s = ""
    else:
        s = str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def render_generic(data) -> str:
    if isinstance(data, dict):
        records = data.get("results") if isinstance(data.get("results"), list) else None
        if records is None:
            return table(["key", "value"], [[k, v] for k, v in flatten(data).items()])
        rest = {k: v for k, v in data.items() if k != "results"}
        head = table(["key", "value"], [[k, v] for k, v in flatten(rest).items()]) + "\n\n" if rest else ""
        return head + render_generic(records)
    if isinstance(data, list):
        if not data:
            return "_(no records)_"
        if all(isinstance(r, dict) for r in data):
            flat = [flatten(r) for r in data]
            cols = list(dict.fromkeys(k for r in flat for k in r))
            return table(cols, [[r.get(c) for c in cols] for r in flat])
        return table(["value"], [[r] for r in data])
    return f"`{_cell(data)}`"


def render_forward(data: dict) -> str:
    m = data.get("machine", {})
    rows = [["jaxprune (JAX, jit)", data.get("jaxprune_tokens_per_s"), data.get("ratio_jaxprune_over_torch")],
            ["transformers (torch)", data.get("torch_tokens_per_s"), 1.0]]
    return "\n".join([
        f"{data.get('model', '?')}, {data.get('dtype', '?')}, batch {data.get('batch')} x seq-len "
        f"{data.get('seq_len')}, median of {data.get('iters')} runs after {data.get('warmup')} warm-up.",
        "",
        table(["implementation", "forward tokens/s", "relative to torch"], rows),
        "",
        f"Machine: {m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, jax {m.get('jax', '?')} "
        f"({m.get('jax_backend', '?')}), torch {m.get('torch', '?')}, transformers {m.get('transformers', '?')}; "
        f"max |logit diff| {_cell(data.get('max_abs_logit_diff'))}; {data.get('date', '')}.",
        *([f"Back to back ({data.get('rounds', '?')} pairs of one jaxprune and one torch forward, median time "
           f"ratio): {data['ratio_back_to_back_median']:.2f}x."] if data.get("ratio_back_to_back_median") else []),
        *([f"Note: {data['note']}"] if data.get("note") else []),
    ])


def render_mfu(data: dict) -> str:
    m = data.get("machine", {})
    peaks = ", ".join(f"{n}: {f / 1e9:.1f}" for n, f in data.get("matmul_peak_flops", {}).items())
    rows = [[data.get("step"), f"{data['batch']} x {data['seq_len']}", "on" if data.get("remat") else "off",
             f"{data['step_s']:.2f}", f"{data['tokens_per_s']:.0f}", f"{data['model_flops_per_step'] / 1e9:.1f}",
             f"{data['achieved_model_flops'] / 1e9:.1f}", f"{data['mfu']:.1%}",
             f"{data['xla_flops_per_step'] / 1e9:.1f}", f"{data['xla_flops_utilisation']:.1%}"]]
    return "\n".join([
        f"{data.get('model_shape')}: one jitted LoRAPrune step (forward, backward w.r.t. LoRA, importance EMA, "
        "AdamW). Model FLOPs: 2 x the forward's (matmuls incl. lm_head, causal attention); the frozen base needs "
        f"no weight gradient. Peak: best square {data.get('dtype', 'float32')} `jnp.dot` here (GFLOP/s by size: {peaks}).", "",
        table(["step", "tokens", "remat", "s / step", "tokens/s", "model GFLOP", "GFLOP/s", "MFU",
               "XLA-counted GFLOP", "XLA FLOPs / peak"], rows), "",
        f"Machine: {m.get('platform', '?')}, {m.get('cpus', '?')} CPUs, jax {m.get('jax', '?')} ({m.get('backend')}), "
        f"load average {m.get('loadavg', 0):.1f}; {data.get('date', '')}. Command: `{data.get('command', '')}`.",
        *([] if m.get("backend") in ("gpu", "tpu") else [
            "", "The bf16 GPU row is the next table (`python scripts/bench_mfu.py --dtype bfloat16 --out "
            "benchmarks/mfu_gpu.json` on a GPU)."]),
        *([f"Note: {data['note']}"] if data.get("note") else []),
    ])


def _mib(b) -> str:
    return f"{b / 2**20:,.0f}" if isinstance(b, (int, float)) else "?"


def render_memory(data: dict) -> str:
    rows = []
    for key, label in (("full_ft", "full fine-tuning"), ("lora", f"LoRA r={data.get('lora_rank')}")):
        r = data.get(key, {})
        rows.append([label, f"{r.get('trainable_params', 0):,}", _mib(r.get("opt_state_bytes")), _mib(r.get("argument")),
                     _mib(r.get("temp")), _mib(r.get("output")), _mib(r.get("alias")), _mib(r.get("total")),
                     _mib(r.get("peak_estimate"))])
    full, lora = (data.get(k, {}).get("peak_estimate") for k in ("full_ft", "lora"))
    ratio = f"{full / lora:.2f}x" if full and lora else "?"
    naive = data.get("ratio_full_over_lora")
    return "\n".join([
        f"One compiled train step (`memory_analysis()`), SmolLM2-135M {data.get('dtype')}, batch {data.get('batch')} "
        f"x {data.get('seq_len')}, AdamW. MiB. The step donates its state: an output that reuses a donated "
        "argument's buffer (aliased) is counted once, so peak = arguments + temporaries + outputs - aliased.", "",
        table(["", "trainable params", "optimizer state", "arguments", "temporaries", "outputs", "aliased",
               "sum (aliased twice)", "peak"], rows), "",
        f"Full fine-tuning needs {ratio} the memory of LoRA (peak, `ratio_full_over_lora_minus_alias`"
        + (f"; the sum that counts the donated buffers twice would say {naive:.2f}x" if naive else "")
        + "); at this batch the activations (temporaries) dominate both and are the same size, so LoRA saves "
        "the weight gradients and optimizer state only.",
    ])


def render_pruning_memory(data: dict) -> str:
    steps = {"loraprune": "LoRAPrune step", "llm_pruner_materialised": "LLM-Pruner, every ∂L/∂W held",
             "llm_pruner_fused": "LLM-Pruner, scores only"}
    rows = [[r["model"], steps.get(r["step"], r["step"]), r["base"], "on" if r["remat"] else "off",
             _mib(r["argument_bytes"]), _mib(r["temp_bytes"]), _mib(r["output_bytes"] - r["alias_bytes"]),
             _mib(r["total_bytes"]), f"{r['ratio_vs_reference']:.2f}x"] for r in data.get("results", [])]
    m = data.get("machine", {})
    return "\n".join([
        f"Compiled memory (`memory_analysis()`, MiB) of one step at batch {data.get('batch')} x "
        f"{data.get('seq_len')} tokens, LoRA rank {data.get('lora_rank')}, AOT-compiled on ShapeDtypeStructs (no "
        "weights allocated). LoRAPrune step: forward, backward w.r.t. LoRA, importance EMA and AdamW in one jit. "
        "LLM-Pruner step: backward w.r.t. the base weights; the reference (1.00x) holds every base-weight "
        "gradient with no remat, as the official PyTorch code does. int8: the frozen decoder linears stored as "
        "int8 with one fp32 scale per output channel (`--quantize-base int8`, the official LoRAPrune's "
        "`load_in_8bit`); LLM-Pruner differentiates the base, so it has no int8 variant.", "",
        table(["shape", "step", "base", "remat", "arguments", "temporaries", "outputs", "total", "vs reference"],
              rows),
        "", f"Backend {m.get('backend')}, jax {m.get('jax')}, {m.get('cpus')} CPUs.",
        *_render_pruning_memory_mesh(data),
    ])


# usable memory per device for the fit column: a TPU v5e chip has 16 GiB HBM, a "24 GB" GPU 24e9 B = 22.35 GiB; less a
# reserve for the runtime
_FIT_GIB = {"fsdp=8": ("v5e-8 chip", 15.0), "none": ("24 GB GPU", 22.0)}


def _render_pruning_memory_mesh(data: dict) -> list[str]:
    """``bench_pruning_memory.py --mesh``: per-device bytes of the 8B steps on fsdp=8 and on one device."""
    rows_in = data.get("mesh_results", [])
    if not rows_in:
        return []
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    steps = {"loraprune": "LoRAPrune step", "llm_pruner_fused": "LLM-Pruner, scores only",
             "llm_pruner_materialised": "LLM-Pruner, every ∂L/∂W held"}
    rows = []
    for r in sorted(rows_in, key=lambda r: (r["model"], r["step"] != "loraprune", r["mesh"] != "fsdp=8",
                                            r["batch"] * r["seq_len"], r["seq_len"])):
        where, limit = _FIT_GIB.get(r["mesh"], (r["mesh"], None))
        fits = "–" if limit is None else (f"yes ({where})" if r["per_device_bytes"] / 2**30 <= limit else f"no ({where})")
        per_dev = r["per_device_batch"]
        rows.append([r["model"], steps.get(r["step"], r["step"]), r["base"], r["mesh"], r.get("devices", 1),
                     f"{r['batch']} x {r['seq_len']}", f"{per_dev:g}", gib(r["argument_bytes"]), gib(r["temp_bytes"]),
                     gib(r["output_bytes"] - r["alias_bytes"]), f"**{gib(r['per_device_bytes'])}**", fits])
    return ["", "**8B shapes on a mesh** (`--mesh fsdp=8` / `--mesh none`, GiB per device; bf16 base, LoRAPrune "
            "with an int8 base and bf16 compute, both with remat; LoRA rank "
            f"{rows_in[0].get('lora_rank')}). Every input has the sharding a run on that mesh gives it (weights, LoRA "
            "and optimizer state split along their logical axes, the batch over the devices). Fits: at most "
            + ", ".join(f"{v} GiB on a {k}" for k, v in ((w, g) for w, g in _FIT_GIB.values()))
            + " (16 GiB HBM per v5e chip, 24 GB = 22.35 GiB on the GPU, less a reserve).", "",
            table(["model", "step", "base", "mesh", "devices", "batch x seq", "seqs / device", "arguments",
                   "temporaries", "outputs", "per device", "fits"], rows), "",
            data.get("mesh_note", "")]


def render_pruning_seeded(data: dict) -> str:
    """bench_pruning.py with seeds: mean ± std per method and ratio, then every seed's row."""
    d, b, m = data.get("dense", {}), data.get("budget", {}), data.get("machine", {})
    pm = lambda s: f"{s['ppl_mean']:.2f}" + (f" ± {s['ppl_std']:.2f}" if s.get("ppl_std") is not None else "")  # noqa: E731
    paired = lambda s: (f"{s['ppl_ratio_vs_plain_mean']:.3f}x ({s['lower_than_plain_on']} lower)"  # noqa: E731
                        if "vs" in s else "")
    acc = ("next_line_acc_norm", "last_word_acc") if "next_line_acc_norm" in d else ()  # --lm-eval-limit
    pct = lambda v: "–" if v is None else f"{v:.1%}"  # noqa: E731
    rows = [["dense", "", "", f"{d.get('ppl', 0):.2f}", *(pct(d[k]) for k in acc), "", "", "0%", "", ""]]
    if b.get("teacher_correction"):
        rows[0][0] = f"dense after teacher correction (as shipped: {d.get('ppl_as_shipped', 0):.2f})"
    for s in sorted(data["summary"], key=lambda s: (-s["ratio"], s["method"])):
        mem = s.get("importance_pass_bytes")
        rows.append([s["method"], s["attn_unit"], s["ratio"], pm(s), *(pct(s.get(f"{k}_mean")) for k in acc),
                     paired(s), len(s["seeds"]), f"{s['params_removed_fraction']:.1%}", _mib(mem) if mem else "–",
                     f"{s['wall_s_mean']:.0f}"])
    each = [[r["seed"], r["ratio"], r["method"] + "".join(f"+{o}" for o in r.get("options", [])), r["attn_unit"],
             f"{r['ppl']:.2f}", *(pct(r.get(k)) for k in acc)] for r in data.get("results", [])]
    acc_names = ["next line acc_norm", "last word acc"] if acc else []
    select = b.get("select_steps") or 0
    protocol = (f"LoRAPrune selects its units in a {select}-step LoRA run (masks every {b.get('prune_every')} steps, "
                f"cubic schedule), then the masks freeze; LLM-Pruner scores once on {b.get('calib_samples')} "
                f"sequences x {b.get('calib_len')} tokens (the tokens LoRAPrune's selection sees), "
                f"{b.get('calib_batch')} per pass. "
                f"Then every method recovers with fresh rank-{b.get('lora_rank')} LoRA for {b.get('steps')} steps of "
                f"{b.get('grad_accum', 1)} x {b.get('batch_size')} x {b.get('seq_len')} tokens at the same schedule"
                if select else
                f"LoRAPrune prunes during {b.get('steps')} LoRA steps; the baselines prune first, then recover")
    return "\n".join([
        *([f"Teacher correction: the dense model first gets {b['teacher_correction']} LoRA steps of "
           f"{b.get('batch_size')} x {b.get('seq_len')} tokens on the training plays, merged (Minitron); every method "
           "prunes that model and `+distill` distils from it.", ""] if b.get("teacher_correction") else []),
        f"{str(data.get('model', 'SmolLM2-135M')).split(' (')[0]}; a row's `widths=` option names its allocation "
        f"(`uniform`: every layer; without the option, `layerwise`: every layer but the first 3 and the last). "
        f"{protocol}. "
        "`+distill`: recovery on (1-a)·CE + a·KL to the unpruned model (`--distill`; a = 0.5 unless "
        "`+distill-alpha=a`). Perplexity on "
        f"{b.get('eval_tokens')} held-out tokens at seq-len {b.get('eval_seq_len')}; mean ± std (ddof 1) over seeds "
        f"{', '.join(map(str, sorted({r['seed'] for r in data.get('results', [])} or set(b.get('seeds', [])))))} "
        "(those that ran; seed: calibration draw, batch order, LoRA init). Memory: compiled "
        "bytes of one importance pass at these shapes (`memory_analysis()`, no remat).", "",
        "Paired: perplexity over the plain method's at the same seeds (a `+distill` row: same units, only the "
        "recovery differs; a `widths=` / `ratio=` / `recover-steps=` row: a different allocation or no recovery), "
        "and on how many seeds it is lower by more than 0.1%.", "",
        *([f"Accuracy: the local lm-eval tasks (README: lm-eval) on their first {b.get('lm_eval_limit')} documents "
           "each, `jaxprune lm-eval --tasks shakespeare_next_line,shakespeare_last_word` (chance: 25% on next line; "
           "mean over seeds).", ""] if acc else []),
        table(["method", "attention unit", "ratio", "perplexity", *acc_names, "paired vs plain", "seeds",
               "all params removed", "importance pass MiB", "wall s / run"], rows), "",
        "<details><summary>every run</summary>", "",
        table(["seed", "ratio", "method", "unit", "perplexity", *acc_names], each), "", "</details>", "",
        f"Command: `{data.get('command', '?')}` ({data.get('wall_s', 0) / 60:.0f} min). Machine: "
        f"{m.get('platform', '?')}, {m.get('cpus', '?')} CPUs, load average {m.get('loadavg_start', 0):.1f} at start, "
        f"{m.get('loadavg_end', 0):.1f} at end.",
        *(["", f"Note: {data['note']}"] if data.get("note") else []),
    ])


def render_budget(data: dict) -> str:
    """bench_pruning.py runs whose method specs override the defaults (issue 31: methods at equal parameters)."""
    return "\n".join([
        "Method options override the defaults below: `widths=global|uniform` (allocation), `ratio=r` (chosen so "
        "that every row removes about the same share of all parameters: see the 'all params removed' column), "
        "`recover-steps=0` (retraining-free: no LoRA recovery).", "", render_pruning_seeded(data)])


def render_pruning(data: dict) -> str:
    if data.get("summary"):
        return render_pruning_seeded(data)
    d = data.get("dense", {})
    b = data.get("budget", {})
    rows = [["dense", "", "", f"{d.get('ppl', 0):.2f}", "0%", "", "", "1.00x"]]
    for r in data.get("results", []):
        method = r["method"] + (f" ({r['base']} base)" if r.get("base", "float") != "float" else "")
        rows.append([method, r["attn_unit"], r["ratio"], f"{r['ppl']:.2f}", f"{r['params_removed_fraction']:.1%}",
                     f"{r['heads_pruned']:.0%}", f"{r['channels_pruned']:.0%}", f"{r['speedup_vs_dense']:.2f}x"])
    return "\n".join([
        f"SmolLM2-135M, {b.get('steps')} LoRA steps of {b.get('grad_accum', 1)} x {b.get('batch_size')} x "
        f"{b.get('seq_len')} tokens (accumulation x batch x length) for every "
        f"method (LoRAPrune prunes during them; the baselines prune first, then recover), perplexity on "
        f"{b.get('eval_tokens')} held-out tokens at seq-len {b.get('eval_seq_len')}. LoRAPrune sets masks every "
        f"{b.get('prune_every', 10)} steps; seed {b.get('seed', 0)}.", "",
        table(["method", "attention unit", "ratio", "perplexity", "all params removed", "heads pruned",
               "channels pruned", "forward speed vs dense"], rows),
        "", f"Machine: {data.get('machine', {}).get('platform', '?')}, {data.get('machine', {}).get('cpus', '?')} CPUs.",
        *(["", f"Note: {data['note']}"] if data.get("note") else []),
    ])


def render_posttraining(data: dict) -> str:
    d, b, m = data.get("dense", {}), data.get("budget", {}), data.get("machine", {})
    results = data.get("results", [])
    rec = b.get("recover_steps", 0) > 0
    fmt = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else ""  # noqa: E731
    kd = any("ppl_recovered_distill" in r for r in results)  # bench_posttraining.py --distill
    zeros_kept = lambda r: {True: "yes", False: "NO"}.get(  # noqa: E731
        r.get("zeros_are_masks") if r.get("zeros_are_masks_distill", True) else False, "")
    rows = [["dense", "", "0%", fmt(d.get("ppl")), fmt(d.get("ppl_recovered")), *([""] if kd else []), "", "", "", ""]]
    for r in results:
        rows.append([r["method"], r["pattern"], f"{r['sparsity_measured']:.1%}", fmt(r["ppl"]),
                     fmt(r.get("ppl_recovered")), *([fmt(r.get("ppl_recovered_distill")) or "–"] if kd else []),
                     zeros_kept(r),
                     f"{r['prune_s']:.0f}", _mib(r["peak_compiled_bytes"]) if r.get("peak_compiled_bytes") else "–",
                     r.get("damp_retries", "")])
    order = []
    for pattern in dict.fromkeys(r["pattern"] for r in results):
        for key, label in (("ppl", "pruned"), ("ppl_recovered", "after recovery")):
            rs = sorted((r for r in results if r["pattern"] == pattern and key in r), key=lambda r: r[key])
            if rs:
                order.append(f"- {pattern}, {label}: " + " < ".join(f"{r['method']} {r[key]:.1f}" for r in rs))
    recovery = (f"then {b.get('recover_steps')} LoRA steps (`finetune --keep-sparsity --merge`, rank 8, "
                f"{b.get('recover_batch_size')} x {b.get('recover_seq_len')} tokens) on the training plays; the dense "
                "row's second number is the dense model after the same LoRA steps (the plays are in-domain, so "
                "LoRA helps it too)" if rec else "no LoRA recovery")
    return "\n".join([
        f"{data.get('model', 'SmolLM2-135M')}: every linear of every decoder layer pruned in one shot, sequential "
        f"calibration on {b.get('calib_samples')} sequences x {b.get('calib_len')} tokens from the training plays "
        f"(magnitude uses none), {recovery}. Perplexity on the first {b.get('eval_tokens')} held-out tokens at seq-len "
        f"{b.get('eval_seq_len')}. Peak memory: the largest compiled pruning pass (calibration capture, SparseGPT "
        "sweep or layer forward), arguments + outputs + temporaries.", "",
        *([f"Base: `{Path(b['base']).parent.name}` (SmolLM2 after merged LoRA steps on the training plays: "
           "Minitron's teacher correction, from `bench_pruning.py --teacher-correction`); it is pruned and it is the "
           "teacher.", ""] if "teacher-correction" in str(b.get("base", "")) else []),
        *([f"After distillation: the same recovery with `--distill --distill-alpha {b.get('distill_alpha')}` (KL to "
           "the unpruned model; SparseGPT refuses it: it rewrites the kept weights).", ""] if kd else []),
        table(["method", "pattern", "zeros", "perplexity", "after recovery", *(["after distillation"] if kd else []),
               "zeros = mask after merge", "prune s", "peak compiled MiB", "damp retries"], rows), "",
        "Order by perplexity (papers: SparseGPT ≤ Wanda < magnitude):", "", *order, "",
        *([f"Note: {data['note']}", ""] if data.get("note") else []),
        *([f"Note added after the run: {data['note_after_run']}", ""] if data.get("note_after_run") else []),
        f"Command: `{data.get('command', '?')}` ({data.get('wall_s', 0) / 60:.0f} min). Machine: "
        f"{m.get('platform', '?')}, {m.get('cpus', '?')} CPUs ({m.get('device', '?')}), load average "
        f"{m.get('loadavg_start', 0):.1f} at start, {m.get('loadavg_end', 0):.1f} at end; {data.get('date', '')}.",
    ])


def render_pretrain_seeded(data: dict) -> str:
    """bench_pretrain.py with specs and seeds: mean ± std per spec, then every run."""
    b, m = data.get("budget", {}), data.get("model", {})
    pm = lambda mean, std: f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")  # noqa: E731
    rows = []
    for s in data.get("summary", []):
        first = next(r for r in data["results"] if r["spec"] == s["spec"])
        ratio = s.get("step_time_vs_full")
        rows.append([s["spec"], ",".join(map(str, s["seeds"])), f"{s['trainable_params']:,}",
                     f"{first['linear_params_stored']:,} / {first['linear_params_dense']:,}",
                     _mib(first.get("opt_state_bytes")), _mib(s.get("step_memory", {}).get("total")),
                     f"{ratio:.2f}x" if ratio else "-", pm(s["val_ppl_mean"], s["val_ppl_std"]),
                     pm(s["heldout_ppl_mean"], s["heldout_ppl_std"])])
    runs = [[r["spec"], r["seed"], f"{r['val_ppl']:.2f}", f"{r['heldout_ppl']:.2f}", f"{r['final_loss']:.3f}",
             f"{r['train_wall_s']:.0f}"] for r in data.get("results", [])]
    return "\n".join([
        f"Recipe `configs/{data.get('config')}`: a LLaMA from random init (hidden {m.get('hidden_size')}, MLP "
        f"{m.get('intermediate_size')}, {m.get('num_layers')} layers, {m.get('num_heads')} heads, tokenizer "
        f"{m.get('tokenizer')}, tied embeddings), {b.get('steps')} steps of {b.get('batch_size')} x "
        f"{b.get('seq_len')} tokens ({b.get('tokens', 0):,} tokens) of the training plays, lr {b.get('lr')} with "
        f"{b.get('warmup_steps')} warm-up steps and cosine decay, clip-norm {b.get('clip_norm')}; the same seeded "
        "batches for every spec at a seed (the seed also draws the init and SLTrain's support). A spec is "
        "`METHOD[:flag=value...]` on top of the recipe. Validation perplexity on the held-out tail of the "
        "training stream; held-out perplexity on "
        f"{data.get('eval', {}).get('max_tokens')} tokens of Hamlet, Macbeth and The Tempest (seq-len 128); "
        "mean ± std (ddof 1) over seeds. Linear params: stored for the attention and MLP linears / their dense "
        "count. Memory in MiB (optimizer state; XLA `memory_analysis()` of the compiled step); step time is a "
        "ratio to full rank, timed round-robin in one process (\"-\": not timed).", "",
        table(["spec", "seeds", "trainable params", "linear params (stored / dense)", "optimizer state",
               "train step", "step time", "val ppl", "held-out ppl"], rows), "",
        "Every run:", "",
        table(["spec", "seed", "val ppl", "held-out ppl", "final train loss", "train s"], runs), "",
        *([f"Note: {data['note']}", ""] if data.get("note") else []),
        f"Command: `{data.get('command', '?')}`. Machine: {data.get('machine', {}).get('platform', '?')}, "
        f"{data.get('machine', {}).get('cpus', '?')} CPUs; {data.get('date', '')}.",
    ])


def render_pretrain(data: dict) -> str:
    if "summary" in data:
        return render_pretrain_seeded(data)
    b, m = data.get("budget", {}), data.get("model", {})
    rows = []
    for r in data.get("results", []):
        ratio = r.get("step_time_vs_full")
        rows.append([r["method"], f"{r['trainable_params']:,}",
                     f"{r['linear_params_stored']:,} / {r['linear_params_dense']:,}", _mib(r.get("opt_state_bytes")),
                     _mib(r.get("step_memory", {}).get("total")), f"{ratio:.2f}x" if ratio else "?",
                     f"{r['val_ppl']:.1f}", f"{r['heldout_ppl']:.1f}"])
    return "\n".join([
        f"A LLaMA from random init (hidden {m.get('hidden_size')}, MLP {m.get('intermediate_size')}, "
        f"{m.get('num_layers')} layers, {m.get('num_heads')} heads, SmolLM2's 49,152-token vocabulary, tied "
        f"embeddings), {b.get('steps')} steps of {b.get('batch_size')} x {b.get('seq_len')} tokens "
        f"({b.get('tokens', 0):,} tokens) of the training plays at lr {b.get('lr')}, the same seeded batches for "
        "every method. Validation perplexity on the held-out tail of the training stream; held-out perplexity "
        f"on {data.get('eval', {}).get('max_tokens')} tokens of Hamlet, Macbeth and The Tempest (seq-len 128). "
        "Linear params: what the method stores for the attention and MLP linears vs their dense count. "
        "Memory in MiB (XLA `memory_analysis()` of the compiled step: arguments + outputs + temporaries); "
        "step time is a ratio to full rank, timed round-robin in one process.", "",
        table(["method", "trainable params", "linear params (stored / dense)", "optimizer state", "train step",
               "step time", "val ppl", "held-out ppl"], rows),
        "", f"Command: `{data.get('command', '?')}`. Machine: {data.get('machine', {}).get('platform', '?')}, "
        f"{data.get('machine', {}).get('cpus', '?')} CPUs; {data.get('date', '')}.",
    ])


def render_kernels(data: dict) -> str:
    if data.get("mode") == "interpret-correctness":
        rows = [[f"{c['shape'][0]}x{c['shape'][1]}", f"{c['sparsity']:.0%}",
                 f"{c['max_rel_err']['block_sparse']:.1e}", f"{c['max_rel_err']['masked_lowrank']:.1e}",
                 "yes" if c["ok"] else "NO"]
                for c in data.get("checks", [])]
        return "\n".join([
            f"{data.get('note', '')}", "",
            "Timings need a GPU/TPU: `python scripts/bench_kernels.py --tiles` there times both kernels against "
            "dense `jnp.dot` and the XLA masked merge and every candidate tile size (one H200 run: the next table).",
            "",
            table(["K x N", "sparsity", "block-sparse max rel err", "masked low-rank max rel err", "ok"], rows), "",
            f"Backend {data.get('backend')}, jax {data.get('jax')}.",
        ])
    sp = lambda r, mode, key: f"{r[mode][key]:.2f}x"  # noqa: E731
    rows = [[f"{r['shape'][0]}x{r['shape'][1]}", f"{r['sparsity']:.0%}", f"{r['fwd_ms']['dense']:.3f}",
             sp(r, "fwd_speedup", "block_sparse_vs_dense"), sp(r, "fwd_speedup", "masked_lowrank_vs_xla_merge"),
             sp(r, "fwd_bwd_speedup", "block_sparse_vs_dense"), sp(r, "fwd_bwd_speedup", "masked_lowrank_vs_xla_merge")]
            for r in data.get("results", [])]
    tiles = [[t["kernel"], f"{t['shape'][0]}x{t['shape'][1]}", "x".join(map(str, t["tile"])),
              f"{t['fwd_ms']:.3f}" if "fwd_ms" in t else t.get("error", "")] for t in data.get("tiles_tried", [])]
    return "\n".join([
        f"{data.get('dtype')}, {data.get('iters')} timed runs (median), block {data.get('block')}, rank "
        f"{data.get('rank')}; speedups are the reference's time over the kernel's.", "",
        table(["K x N", "block sparsity", "dense fwd ms", "block-sparse vs dense (fwd)",
               "masked low-rank vs XLA merge (fwd)", "block-sparse vs dense (fwd+bwd)",
               "masked low-rank vs XLA merge (fwd+bwd)"], rows), "",
        *(["Tile sizes tried (90% block sparsity, forward):", "", table(["kernel", "K x N", "tile", "ms"], tiles), ""]
          if tiles else []),
        f"Backend {data.get('backend')} ({', '.join(data.get('devices', [])[:1])}), jax {data.get('jax')}.",
        *(["", f"Note: {data['note']}"] if data.get("note") else []),
    ])


def render_export(data: dict) -> str:
    d, b, m = data.get("dense", {}), data.get("budget", {}), data.get("machine", {})
    rows = [["dense", "", f"{d.get('ppl', 0):.2f}", f"{d.get('params', 0):,}", f"{d.get('hf_bytes', 0) / 1e6:.0f}",
             "", "", "1.00x"]]
    for r in data.get("results", []):
        rows.append([r["layout"], f"{r['ratio']:.3f}", f"{r['ppl']:.2f}", f"{r['params']:,}",
                     f"{r['hf_bytes'] / 1e6:.0f}" + (" (padded)" if r["hf_padded"] else ""),
                     f"{r['gguf_f32_bytes'] / 1e6:.0f} ({r['gguf_arch']})", f"{r['vllm_bytes'] / 1e6:.0f}",
                     f"{r['transformers_speedup']:.2f}x"])
    return "\n".join([
        f"SmolLM2-135M pruned by LoRAPrune ({b.get('attn_unit')} units) over {b.get('steps')} steps of "
        f"{b.get('batch_size')} x {b.get('seq_len')} tokens, seed {b.get('seed')}, in each width layout; perplexity "
        f"on {b.get('eval_tokens')} held-out tokens. Sizes are the fp32 files each export writes (MB); the speed "
        "column is stock transformers (torch fp32, CPU, 4 x 256 tokens) on the HF export over the dense model, "
        "timed back to back in one process (median of 5 rounds). One seed: perplexity differences of a few "
        "percent are within calibration noise (see the pruning benchmarks).", "",
        table(["layout", "ratio", "perplexity", "parameters", "HF safetensors", "GGUF f32", "vLLM DeciLM",
               "transformers speed vs dense"], rows),
        "", f"Machine: {m.get('platform', '?')}, {m.get('cpus', '?')} CPUs.",
        *(["", f"Note: {data['note']}"] if data.get("note") else []),
    ])


def render_deploy(data: dict) -> str:
    b, m = data.get("budget", {}), data.get("machine", {})
    models, t = data.get("models", {}), b.get("threads")
    rows = []
    for r in data.get("results", []):
        types = ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(r.get("tensor_types", {}).items())[:3])
        sn, s1 = r["speed"].get(f"threads_{t}", {}), r["speed"].get("threads_1", {})
        rows.append([r["model"], r["arch"], f"{models.get(r['model'], {}).get('params', 0):,}", r["outtype"], types,
                     f"{r['bytes'] / 1e6:.1f}", f"{r['ppl']:.2f}", f"{r['ppl_over_f16']:.3f}x",
                     f"{sn.get('pp_tokens_per_s', 0):.0f} ({sn.get('pp_speedup_per_s', 0):.2f}x)",
                     f"{sn.get('tg_tokens_per_s', 0):.1f} ({sn.get('tg_speedup_per_s', 0):.2f}x)",
                     f"{s1.get('pp_tokens_per_cpu_s', 0):.0f} ({s1.get('pp_speedup_per_cpu_s', 0):.2f}x)",
                     f"{s1.get('tg_tokens_per_cpu_s', 0):.1f} ({s1.get('tg_speedup_per_cpu_s', 0):.2f}x)"])
    load = lambda x: "/".join(f"{v:.1f}" for v in x) if x else "?"  # noqa: E731
    return "\n".join([
        f"SmolLM2-135M pruned by {b.get('method', '?').upper()} at ratio {b.get('ratio')} with "
        f"{b.get('recover_steps')} recovery steps, in both width layouts, exported with `export --format gguf` "
        f"and run in llama.cpp (the CPU extension of {data.get('llama_cpp', '?')}). Perplexity: llama.cpp on "
        f"{b.get('eval_tokens')} held-out tokens (windows of {b.get('seq_len')}). Speed: prompt processing of "
        f"{b.get('n_prompt')} tokens in one batch (pp) and {b.get('n_gen')} single-token decodes after it (tg), "
        f"each file timed once per round at {t} threads (wall clock) and at 1 thread (per CPU second: the compute "
        f"itself, which other jobs on the machine do not change), round-robin over {b.get('rounds')} rounds; "
        "(x) = over the dense model in the same weight type within a round, median over rounds.", "",
        table(["model", "arch", "parameters", "type", "stored as (share of weights)", "MB", "perplexity", "vs f16",
               f"pp tokens/s, {t} threads", f"tg tokens/s, {t} threads", "pp tokens/CPU s, 1 thread",
               "tg tokens/CPU s, 1 thread"], rows),
        "", f"Machine: {m.get('platform', '?')}, {m.get('cpus', '?')} CPUs shared with other jobs (load average "
        f"{load(m.get('loadavg_start'))} at the start, {load(m.get('loadavg_end'))} at the end): the wall-clock "
        f"columns at {t} threads swing with that load (llama.cpp's threads spin-wait for each other); the "
        "per-CPU-second columns are the ones to compare.",
        *(["", f"Note: {data['note']}"] if data.get("note") else []),
    ])


def render_loram(data: dict) -> str:
    b, lm = data.get("budget", {}), data.get("loram", {})
    rows = [[r.get("model"), r.get("ppl"), f"{r.get('params', 0):,}",
             f"{r['trainable_params']:,}" if r.get("trainable_params") else "", r.get("train_s")]
            for r in data.get("results", [])]
    mem = data.get("memory", {})
    mrows = [[label, f"{mem.get(k, {}).get('base_params', 0):,}", f"{mem.get(k, {}).get('trainable_params', 0):,}",
              _mib(mem.get(k, {}).get("argument")), _mib(mem.get(k, {}).get("temp")),
              _mib(mem.get(k, {}).get("peak_estimate"))]
             for k, label in (("lora_full", "LoRA on the full model (b)"),
                              ("loram_pruned", "LoRAM: LoRA on the pruned model"),
                              ("qloram_pruned_int8", "QLoRAM: pruned model, int8 base"))]
    ratio, qratio = data.get("memory_ratio_lora_over_loram"), data.get("memory_ratio_lora_over_qloram")
    return "\n".join([
        f"SmolLM2-135M, {lm.get('prune_method')} pruning at ratio {lm.get('ratio')} ({lm.get('attn_unit')}: "
        f"{_cell(lm.get('heads_pruned'))} of the query heads and {_cell(lm.get('channels_pruned'))} of the MLP "
        f"channels of the prunable layers; {lm.get('params_pruned', 0):,} of {lm.get('params_full', 0):,} "
        f"parameters kept), {b.get('align_steps')} alignment steps. LoRA r={b.get('lora_rank')}, "
        f"{b.get('lora_steps')} steps of {b.get('batch_size')} x {b.get('seq_len')} tokens "
        f"({b.get('lora_tokens', 0):,} tokens, the same batches) for (b) and for LoRAM's LoRA stage. Held-out "
        f"perplexity on {b.get('eval_tokens')} tokens of the held-out plays (windows of {b.get('eval_seq_len')}). "
        "train_s: wall seconds of the whole command (LoRAM's includes pruning and saving two models).", "",
        table(["model", "held-out ppl", "params at inference", "trainable params", "train_s"], rows), "",
        "One compiled LoRA train step (`memory_analysis()`, fp32, AdamW, donated state), MiB; peak = arguments + "
        "temporaries + outputs - aliased:", "",
        table(["step", "base params", "trainable params", "arguments", "temporaries", "peak"], mrows), "",
        f"LoRA on the full model needs {ratio:.2f}x the peak memory of LoRAM's step"
        + (f" and {qratio:.2f}x QLoRAM's" if qratio else "") + "." if ratio else "",
        *(["", f"Note: {data['note']}"] if data.get("note") else []),
    ])


def render_adapters(data: dict) -> str:
    """bench_adapters.py: every adapter at LoRA's trainable-parameter count, mean ± std over seeds."""
    b, m = data.get("budget", {}), data.get("machine", {})
    rows = []
    for s in data.get("summary", []):
        ppl = "" if s.get("ppl_mean") is None else (
            f"{s['ppl_mean']:.3f}" + (f" ± {s['ppl_std']:.3f}" if s.get("ppl_std") is not None else "")
            + f" (n={s.get('n')})")
        params = f"{s.get('params', 0):,} ({s.get('vs_lora_params', 0):+.1%})"
        if s.get("live_trainable_params") != s.get("trainable_params"):
            params += f"; stored {s.get('trainable_params', 0):,}"
        ratio = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
        below = "(reference)" if s.get("adapter") == "lora" else s.get("lower_than_lora_on") or ""
        rows.append([s.get("adapter"), s.get("size_flag"), params, ppl, below,
                     ratio(s.get("step_time_vs_lora")), ratio(s.get("step_memory_vs_lora"))])
    loads = [r["loadavg"] for r in data.get("results", []) if r.get("loadavg") is not None]
    seeds = sorted({r["seed"] for r in data.get("results", [])})
    load = f"1-minute load average {min(loads):.1f}-{max(loads):.1f} over the runs" if loads else ""
    timing = data.get("timing")
    source = (f"median of {timing.get('rounds')} rounds of every adapter's compiled step in turn after training "
              "(the same load for all)" if timing else "median timed training step (after the first) over seeds")
    return "\n".join([
        f"{data.get('model')}: `finetune --adapter NAME` at LoRA r={b.get('lora_rank')}'s trainable-parameter count "
        f"(targets {b.get('targets')}; each adapter's `--lora-rank` picked so that its trainable pytree is the "
        f"closest to LoRA's; SparseAdapter: on its live entries, 'stored' being its dense A, B, which size its "
        f"optimizer state), "
        f"{b.get('steps')} steps of {b.get('batch_size')} x {b.get('seq_len')} tokens ({b.get('tokens', 0):,} tokens, "
        f"the same batches per seed), lr {b.get('lr')} (warm-up {b.get('warmup_steps')}, cosine), "
        f"--lora-alpha {b.get('lora_alpha')} for all; seeds run {_cell(seeds)}. Held-out perplexity on "
        f"{b.get('eval_tokens')} tokens of the held-out plays (windows of {b.get('eval_seq_len')}) after merging; "
        f"base model {_cell(data.get('base_ppl'))}. Step time: {source}; memory: the compiled step's temp + "
        "argument bytes (`memory_analysis()`, AdamW, donated state); both over LoRA's in the same process. "
        "'below LoRA': seeds on which the adapter's perplexity is lower than LoRA's at the same seed (same init "
        "draws and batches).", "",
        table(["adapter", "size", "trainable params (vs LoRA)", "held-out ppl mean ± std", "below LoRA (same seed)",
               "step time vs LoRA", "step memory vs LoRA"], rows), "",
        f"Machine: {m.get('cpus')} CPUs ({m.get('backend')}), {m.get('platform')}; {load}, shared with other "
        f"jobs (step-time ratios are noisy). Command: `{data.get('command')}`.",
        *(["", f"Note: {data['note']}"] if data.get("note") else []),
    ])


RENDERERS = {
    "deploy.json": ("Pruned models in llama.cpp: perplexity, 4-bit cost, tokens/s", render_deploy),
    "export.json": ("Pruned models outside jaxprune: layouts, file sizes, transformers speed", render_export),
    "kernels.json": ("Pallas kernels", render_kernels),
    "kernels_gpu.json": ("Pallas kernels on a GPU (H200)", render_kernels),
    "pruning_steps200.json": ("Structured pruning of SmolLM2-135M, 200-step budget", render_pruning),
    "pruning_speed.json": ("Forward speed of the pruned shapes (20-step runs: their perplexities mean nothing)",
                           render_pruning),
    "pruning_steps200_seed1.json": ("Structured pruning of SmolLM2-135M, 200-step budget, second seed",
                                    render_pruning),
    "pruning_accum4_steps50.json": ("Structured pruning of SmolLM2-135M, 50 steps of 4 accumulated batches",
                                    render_pruning),
    "pruning_ratio02_steps120.json": ("Structured pruning of SmolLM2-135M, ratio 0.2, 120-step budget",
                                      render_pruning),
    "posttraining.json": ("Post-training element-wise pruning: magnitude, Wanda, SparseGPT", render_posttraining),
    "posttraining_distill.json": ("Element-wise pruning: LoRA recovery vs distillation recovery at equal tokens",
                                  render_posttraining),
    "posttraining_distill_corrected.json": ("Element-wise pruning of a teacher-corrected SmolLM2: LoRA vs "
                                            "distillation recovery at equal tokens", render_posttraining),
    "forward.json": ("Forward throughput", render_forward),
    "mfu.json": ("Model FLOP utilisation of the LoRAPrune step", render_mfu),
    "mfu_gpu.json": ("Model FLOP utilisation of the LoRAPrune step on a GPU (H200)", render_mfu),
    "memory.json": ("Train-step memory: full fine-tuning vs LoRA", render_memory),
    "pruning_memory.json": ("Pruning-step memory: LoRAPrune vs LLM-Pruner (fp32; 8B shapes on a mesh, bf16)",
                            render_pruning_memory),
    "pruning.json": ("Structured pruning of SmolLM2-135M", render_pruning),
    "pruning_corrected.json": ("Structured pruning of a teacher-corrected SmolLM2-135M: LoRA vs distillation "
                               "recovery", render_pruning),
    "pruning_steps120.json": ("Structured pruning of SmolLM2-135M, 120-step budget", render_pruning),
    "pruning_steps40.json": ("Structured pruning of SmolLM2-135M, 40-step budget: kv_group vs q_head (the attention "
                             "unit's default)", render_pruning),
    "pretrain.json": ("Pretraining from random init, 1M tokens: full rank, low rank, SLTrain, SLoPe, LOST, "
                      "SwitchLoRA, S-STE, and the SLTrain sweep", render_pretrain),
    "pretrain_tiny.json": ("Pretraining from random init, tiny recipe (102k tokens, 49k vocabulary): full rank, "
                           "low rank, SLTrain, SLoPe (one seed; superseded by the 1M-token table)", render_pretrain),
    "pretrain_tiny_new_methods.json": ("Pretraining, tiny recipe (102k tokens): LOST, SwitchLoRA, S-STE beside full "
                                       "rank (one seed; superseded by the 1M-token table)", render_pretrain),
    "loram.json": ("LoRAM: LoRA trained on the pruned model, inference with the full one", render_loram),
    "loram_align12.json": ("LoRAM with 12 alignment steps of the pruned model", render_loram),
    "budget_free.json": ("The best pruned model for a budget: retraining-free, SmolLM2-135M", render_budget),
    "budget_free2.json": ("The best pruned model for a budget: retraining-free, global allocation and Minitron",
                          render_budget),
    "budget_recovered.json": ("The best pruned model for a budget: after equal LoRA recovery, SmolLM2-135M",
                              render_budget),
    "budget_seeds.json": ("The best pruned model for a budget: the headline rows over three seeds", render_budget),
    "budget_depth.json": ("Depth pruning (ShortGPT, ReplaceMe) at the same budget", render_generic),
    "budget_slimgpt_free.json": ("The best pruned model for a budget: SlimGPT and incremental ratios, retraining-free",
                                 render_budget),
    "budget_slimgpt_recovered.json": ("The best pruned model for a budget: SlimGPT after equal LoRA recovery",
                                      render_budget),
    "budget_half_params.json": ("The best pruned model for a budget: half of all parameters removed, SmolLM2-135M, "
                                "after equal LoRA recovery", render_budget),
    "budget_half_params_more.json": ("The best pruned model for a budget: half of all parameters removed, "
                                     "stock-loadable and retraining-free rows", render_budget),
    "budget_half_params_depth.json": ("The best pruned model for a budget: half of all parameters removed by depth "
                                      "pruning (19 of 30 layers)", render_budget),
    **{f"budget_half_params_mix{n}.json": ("The best pruned model for a budget: half of all parameters removed, "
                                           f"stock-loadable mix: ReplaceMe removes {n} layers, then SlimGPT uniform "
                                           "widths", render_budget) for n in (5, 6, 7, 9)},
    "budget_half_params_acc.json": ("The best pruned model for a budget: half of all parameters removed, with the "
                                    "local lm-eval accuracy (3 seeds)", render_budget),
    "budget_half_params_mix6_acc.json": ("The best pruned model for a budget: the stock-loadable mix (ReplaceMe 6 "
                                         "layers, then SlimGPT uniform widths) with the local lm-eval accuracy "
                                         "(3 seeds)", render_budget),
    "budget_fifth_params.json": ("The best pruned model for a budget: about a fifth of all parameters removed, "
                                 "SmolLM2-135M, after equal LoRA recovery", render_budget),
    "parity.json": ("jaxprune vs transformers on the real models (same fp32 weights)", render_generic),
    "budget_gemma3_free.json": ("The best pruned model for a budget: Gemma 3 270M, retraining-free", render_budget),
    "budget_gemma3_recovered.json": ("The best pruned model for a budget: Gemma 3 270M after equal LoRA recovery",
                                     render_budget),
    "adapters.json": ("Adapters vs LoRA at equal trainable parameters: SmolLM2-135M", render_adapters),
    "adapters_gemma3.json": ("Adapters vs LoRA at equal trainable parameters: Gemma 3 270M", render_adapters),
}


def render_file(path: Path) -> str:
    title, fn = RENDERERS.get(path.name, (path.stem.replace("_", " ").capitalize(), render_generic))
    try:
        data = json.loads(path.read_text())
        body = fn(data)
    except Exception as e:  # a broken file is reported, the other files still render
        body = f"_could not render {path.name}: {type(e).__name__}: {e}_"
    plot = path.with_suffix(".png")
    if plot.exists():  # a benchmark's plot sits next to its JSON under the same name
        body += f"\n\n![{title}]({path.parent.name}/{plot.name})"
    return f"## {title}\n\nSource: `{path.parent.name}/{path.name}`\n\n{body}\n"


NOTES = """\
Machine: the 2-core, 24 GiB CPU development box, except the two tables marked H200 (one GPU lent on
2026-12-04). Many runs shared the two cores with other jobs: wall-clock and tokens/s figures in those files are noisy (files with a note say so). The
forward-speed ratios to trust are in "Forward speed of the pruned shapes": taken on an idle machine,
timed back to back with the dense model. Perplexities and compiled-memory figures do not depend on
load. Compiled memory comes from XLA:CPU, which upcasts bf16 dots to f32 (so the pruning-memory
benchmark runs in fp32) and drops the optimisation barriers that keep per-layer remat from being
undone by CSE (so remat barely lowers temporaries here); GPU/TPU figures will differ."""


def build(bench_dir: Path) -> str:
    files = sorted(bench_dir.glob("*.json")) if bench_dir.is_dir() else []
    parts = ["# Benchmarks",
             "",
             "Generated by `python scripts/make_benchmarks_md.py` from `benchmarks/*.json`; do not edit by hand. "
             "Each JSON is written by a script in `scripts/` (see its `command` field).",
             "",
             *[f"> {line}" for line in NOTES.splitlines()],
             ""]
    if not files:
        parts.append("_No benchmark results yet (run `make bench`)._\n")
    parts += [render_file(f) for f in files]
    return "\n".join(parts)




def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(REPO / "benchmarks"))
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    a = p.parse_args(argv)
    out = Path(a.out)
    write_text_atomic(out, build(Path(a.dir)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
