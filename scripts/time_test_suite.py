"""Wall time of the whole test suite, run exactly as `make test` runs it, written to benchmarks/test_suite.json.

    python scripts/time_test_suite.py [--out benchmarks/test_suite.json]

Records the seconds, pytest's summary line, the slowest tests, the CPU count and the load average at the
start and the end (a loaded machine makes the figure an upper bound).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxprune.fileio import write_json_atomic  # noqa: E402
from jaxprune.fixtures import cache_dir  # noqa: E402

PYTEST = ["-m", "pytest", "-x", "-q", "-n", "2", "--dist", "loadfile", "--durations=15", "tests"]  # = Makefile's


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "test_suite.json"))
    a = ap.parse_args()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    # as `make test` runs it: with XLA's persistent compilation cache (a warm cache hides no dump, see
    # bench_pruning_memory._compile, and is what CI has)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir() / "xla-cache")  # = the Makefile's
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache)
    proc = subprocess.run([sys.executable, *PYTEST], cwd=REPO, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    lines = proc.stdout.splitlines()
    summary = next((l.strip("= ") for l in reversed(lines) if re.search(r"\d+ (passed|failed)", l)), "")
    slowest = [l.strip() for l in lines if re.match(r"\s*\d+\.\d+s (call|setup|teardown)", l)]
    write_json_atomic(a.out, {
        "command": f"python {' '.join(PYTEST)}", "returncode": proc.returncode, "seconds": round(seconds, 1),
        "summary": summary, "failed": [l for l in lines if l.startswith("FAILED")], "slowest": slowest, "cpus": os.cpu_count(), "machine": platform.platform(),
        "load_average_start": load0[0], "load_average_end": os.getloadavg()[0],
        "date": datetime.date.today().isoformat(), "compilation_cache": cache,
    })
    print(f"{summary} in {seconds / 60:.1f} min -> {a.out}")
    print("\n".join(l for l in lines if l.startswith("FAILED")))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
