"""Finding, checking and running lm-evaluation-harness tasks (lm-eval is imported lazily, inside functions).

Task names resolve against lm-eval's built-in tasks, the local family in ``jaxprune/lm_tasks`` (always
included) and ``--include-path`` folders. Everything the user can get wrong becomes one ``UserError`` line:
an unknown task, a task file that is not YAML or not a task, a task that fails to build, and a task whose data
must come from the hub while the hub cannot be reached (offline mode, set here when no network answers).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import socket
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlparse

import yaml

from .errors import UserError, field_ref
from .lm_tasks import TASKS_DIR

DEFAULT_HUB = "https://huggingface.co"
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub ($HF_ENDPOINT, else huggingface.co) opens within ``timeout``."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_HUB)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def ensure_offline_if_unreachable() -> bool:
    """Offline mode (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1) unless the hub answers; True when offline."""
    if not any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_VARS):
        if hub_reachable():
            return False
        for v in OFFLINE_VARS:
            os.environ[v] = "1"
    # both libraries read the variables at import time: update them if they are already loaded
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    return True


class _TaskYamlLoader(yaml.SafeLoader):
    """YAML with lm-eval's ``!function module.name`` tags (kept as strings: only the structure is checked)."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix}")


def check_task_files(folder: Path) -> None:
    """A UserError naming the first ``*.yaml`` under ``folder`` that is not YAML or not a task / group.

    (lm-eval itself skips such files silently; the task then reads as unknown.)"""
    for path in sorted(folder.rglob("*.yaml")):
        try:
            cfg = yaml.load(path.read_text(encoding="utf-8", errors="replace"), Loader=_TaskYamlLoader)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" line {where.line + 1}:" if where is not None else ""
            raise UserError(f"{path}:{line} not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(cfg, dict) or not any(k in cfg for k in ("task", "group", "include")):
            raise UserError(f"{path}: not an lm-eval task file (a mapping with a 'task' or 'group' key)")


def find_tasks(names: list[str], include_paths: list[str] | None = None):
    """(lm-eval TaskManager, task names with globs expanded) for ``names``; a UserError for an unknown one.

    The folders searched: ``jaxprune/lm_tasks``, the ``include_paths`` (their YAML checked first) and, unless
    every name is found in those, lm-eval's built-in tasks (indexing those takes seconds)."""
    folders = [TASKS_DIR]
    for p in include_paths or []:
        path = Path(p)
        if not path.is_dir():
            raise UserError("not a directory", field="include_paths", value=p)
        folders.append(path.resolve())
    for folder in folders:
        check_task_files(folder)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task notices would bury the results
    paths = tuple(str(f) for f in folders)
    if not any(c in n for n in names for c in "*?["):
        local = _task_manager(paths, False)
        if all(n in local.all_tasks for n in names):
            return local, list(names)
    full = _task_manager(paths, True)
    return full, resolve_names(full, names)


@functools.lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], defaults: bool):
    """lm-eval's TaskManager over ``paths`` (+ its built-in tasks): an index of YAML files, kept per process."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=list(paths), include_defaults=defaults)


def resolve_names(tm, names: list[str]) -> list[str]:
    """Task / group / tag names (glob patterns expanded); an unknown one is a UserError with suggestions."""
    out = []
    for name in names:
        if any(c in name for c in "*?["):
            matched = tm.match_tasks([name])
            if not matched:
                raise UserError("matches no task", field="tasks", value=name)
            out += [m for m in matched if m not in out]
        elif name in tm.all_tasks or (name.endswith(".yaml") and Path(name).is_file()):
            out.append(name)
        else:
            close = difflib.get_close_matches(name, tm.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown task {name!r} (not among lm-eval's tasks, jaxprune's local tasks "
                            f"or {field_ref('include_paths')}){hint}")
    return out


def load_tasks(tm, names: list[str], offline: bool) -> list:
    """Build each named task / group / tag (its data loaded): a list of lm-eval Task and Group objects."""
    built = []
    for name in names:
        try:
            loaded = tm.load([name])
        except Exception as e:  # lm-eval and datasets raise anything from KeyError to ConnectionError
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if offline and isinstance(e, (ConnectionError, OSError)):
                raise UserError(f"task {name} needs a download from the hub, which is not reachable (offline "
                                f"mode): {msg}; run it with network, or use a local task") from None
            raise UserError(f"task {name}: cannot be built: {type(e).__name__}: {msg}") from None
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        else:
            built += list(loaded["tasks"].values())
    return built


def evaluate(lm, tasks: list, tm, *, num_fewshot: int | None = None, limit: int | None = None,
             bootstrap_iters: int = 1000, seed: int = 0) -> dict:
    """lm-eval's ``simple_evaluate`` over built tasks: its full results dict (``results``, ``samples``, ...)."""
    import lm_eval
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # bootstrap in-process: lm-eval's fork pool can deadlock JAX
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, num_fewshot=num_fewshot, limit=limit,
                                   bootstrap_iters=bootstrap_iters, log_samples=True, random_seed=seed,
                                   numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}}: the numeric metrics of each task and group (stderr keys kept, 'N/A' dropped)."""
    out = {}
    for task, values in {**results.get("results", {}), **results.get("groups", {})}.items():
        out[task] = {k.removesuffix(",none"): float(v) for k, v in values.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len"}
    return out


def per_request(results: dict) -> dict[str, list[dict]]:
    """{task: [{doc_id, resps}]}: every request's raw answer (log-likelihood, is_greedy / text) per document."""
    return {task: [{"doc_id": s["doc_id"], "resps": s["resps"]} for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results.get("samples", {}).items()}


def require_lm_eval(pinned: str) -> str:
    """lm-eval's version; a UserError when it is not installed, a stderr line when it is not ``pinned``."""
    try:
        found = version("lm_eval")
    except PackageNotFoundError:
        raise UserError(f"lm-eval is not installed: pip install 'jaxprune[eval]' (lm-eval=={pinned})") from None
    if found != pinned:
        print(f"warning: lm-eval {found} installed; jaxprune is tested against {pinned}", file=sys.stderr)
    return found


def table(results: dict) -> str:
    """lm-eval's markdown table of the results (and of the groups, when any)."""
    from lm_eval.utils import make_table
    return make_table(results) + (("\n" + make_table(results, "groups")) if results.get("groups") else "")
