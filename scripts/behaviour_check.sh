#!/bin/bash
# Behaviour unchanged across a refactor: small-budget versions of the benchmarks' runs (structured, LoRAPrune with
# and without a selection run, Wanda, SparseGPT 2:4, LoRAM, SLTrain and SLoPe pretraining) on the real SmolLM2,
# losses per step and held-out perplexities written to OUTDIR. Run it on two checkouts and diff:
#   git worktree add /tmp/before <old commit>
#   scripts/behaviour_check.sh /tmp/before /tmp/behav/before && scripts/behaviour_check.sh $PWD /tmp/behav/after
#   diff /tmp/behav/before/losses.txt /tmp/behav/after/losses.txt     # bitwise-equal losses
# usage: behaviour_check.sh REPO OUTDIR  (TEXT: the first 60,000 characters of the training plays)
set -e
REPO=$1; OUT=$2; rm -rf $OUT; mkdir -p $OUT
PY=/work/main/.venv/bin/python
export PYTHONPATH=$REPO
M=/root/.cache/jaxprune/smollm2-hf
T=$OUT.train.txt
$PY -c "from jaxprune.fixtures import fixture_paths; import sys; sys.stdout.write(fixture_paths().train_text.read_text()[:60000])" > $T
C="--text $T --seq-len 64 --batch-size 2 --no-progress --json --val-every 0 --save-every 100"
cd $REPO
$PY -m jaxprune.cli prune $M --method llm-pruner --ratio 0.5 --widths layerwise --steps 3 --calib-samples 2 --calib-len 32 $C --out $OUT/llmp | tail -1 > $OUT/llmp.json
$PY -m jaxprune.cli prune $M --method loraprune --ratio 0.5 --widths layerwise --steps 6 --prune-every 2 $C --out $OUT/lp | tail -1 > $OUT/lp.json
$PY -m jaxprune.cli prune $M --method loraprune --ratio 0.5 --widths layerwise --select-steps 4 --prune-every 2 --recover-steps 2 $C --out $OUT/lpsel | tail -1 > $OUT/lpsel.json
$PY -m jaxprune.cli prune $M --method wanda --sparsity 0.5 --calib $T --calib-samples 4 --calib-len 32 --no-progress --json --out $OUT/wanda | tail -1 > $OUT/wanda.json
$PY -m jaxprune.cli prune $M --method sparsegpt --pattern 2:4 --calib $T --calib-samples 4 --calib-len 32 --no-progress --json --out $OUT/sgpt | tail -1 > $OUT/sgpt.json
$PY -m jaxprune.cli loram $M --prune-method llm-pruner --ratio 0.5 --steps 2 --calib-samples 2 --calib-len 32 $C --out $OUT/loram | tail -1 > $OUT/loram.json
$PY -m jaxprune.cli pretrain --method sltrain --steps 3 --text $T --seq-len 64 --batch-size 2 --no-progress --json --val-every 0 --out $OUT/pre | tail -1 > $OUT/pre.json
$PY -m jaxprune.cli pretrain --method slope --steps 3 --text $T --seq-len 64 --batch-size 2 --no-progress --json --val-every 0 --out $OUT/slope | tail -1 > $OUT/slope.json
for d in llmp lp lpsel loram/train pre slope; do echo "$d $(cat $OUT/$d/metrics.jsonl | $PY -c 'import sys,json; print([json.loads(l)["loss"] for l in sys.stdin])')"; done > $OUT/losses.txt
for m in wanda sgpt; do $PY -m jaxprune.cli eval $OUT/$m --text $T --seq-len 64 --max-tokens 1024 --json | tail -1 >> $OUT/evals.txt; done
$PY -m jaxprune.cli eval $OUT/lp --text $T --seq-len 64 --max-tokens 1024 --json | tail -1 >> $OUT/evals.txt
$PY -m jaxprune.cli eval $OUT/loram/model --text $T --seq-len 64 --max-tokens 1024 --json | tail -1 >> $OUT/evals.txt
