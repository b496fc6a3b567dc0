#!/usr/bin/env bash
# The GPU/TPU checks to run when a session is lent an accelerator (the `device` tool), in priority order, each
# under its own time limit so one stuck step cannot eat the lease. Results go to $OUT (default benchmarks/device).
#
#   bash scripts/device_checks.sh            # on the accelerator machine, from the repo root
#
# 1. scripts/bench_kernels.py --tiles: both Pallas kernels vs jnp.dot and the XLA masked merge, bf16, SmolLM2
#    and LLaMA-7B shapes, every candidate tile (benchmarks/kernels.json; kernels/block_sizes.py is set from it).
# 2. pytest of the kernel tests on the accelerator (compiled Triton/Mosaic kernels, not interpret mode) and
#    the --impl tests (eval / generate / finetune --keep-sparsity through the kernel == XLA; on an accelerator
#    `--impl auto` must pick the kernel, so the CPU-only assertion `auto == xla` is expected to fail there).
# 3. scripts/bench_mfu.py --dtype bfloat16: the LoRAPrune step's model FLOP utilisation (benchmarks/mfu_gpu.json).
# The machine's python may carry other jax/flax versions than our pins: the probe records them.
set -u
OUT=${OUT:-benchmarks/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# `kernels/` is installed as jaxprune.kernels (pyproject package-dir); without an install, link it.
[ -e jaxprune/kernels ] || ln -s ../kernels jaxprune/kernels
PY=${PY:-python3}
{ nvidia-smi -L 2>/dev/null; $PY -c "import jax, flax, optax, sys; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"; } 2>&1 | tee "$OUT/probe.txt"
timeout "${T_KERNELS:-200}" $PY scripts/bench_kernels.py --tiles --iters "${ITERS:-10}" --out "$OUT/kernels.json" \
  2>&1 | tee "$OUT/kernels.log" | grep -v "^ *$" | tail -40
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${T_TESTS:-150}" $PY -m pytest -q -p no:cacheprovider -rfE \
  tests/kernels tests/test_lora_matmul.py tests/test_impl_flag.py 2>&1 | tee "$OUT/pytest.log" | tail -40
timeout "${T_MFU:-90}" $PY scripts/bench_mfu.py --dtype bfloat16 --batch 16 --seq-len 1024 --sizes 4096,8192 \
  --out "$OUT/mfu_gpu.json" 2>&1 | tee "$OUT/mfu.log" | tail -5
