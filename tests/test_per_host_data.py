"""Per-host data (``data.training_blocks`` with several processes): each host reads and tokenises only its share
of the text, and the global batches assembled from the hosts' rows equal the one-process ``Blocks`` bitwise.

The references are the one-process path, ``data.token_stream`` + ``data.Blocks`` (datasets' text loader, whole
documents tokenised at once), computed here, apart from the per-host code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port

from jaxprune import data

SEQ, SEED = 32, 3


def texts(tmp_path: Path, small_text: Path) -> dict[str, Path]:
    """One file (Unix newlines), one with \\r\\n newlines and non-ASCII, and a directory of 4 documents of
    unequal sizes (one empty)."""
    src = small_text.read_text()
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes((src[:20_000].replace("\n", "\r\n") + "é😀 naïve\r").encode())
    d = tmp_path / "docs"
    d.mkdir()
    for name, (a, b) in {"a": (0, 6_000), "b": (6_000, 6_000), "c": (6_000, 31_000), "d": (31_000, 40_000)}.items():
        (d / f"{name}.txt").write_text(src[a:b])
    return {"file": small_text, "crlf": crlf, "dir": d}


def simulate(path, tok, n: int, margin: int = data.MARGIN):
    """The per-host streams of ``n`` hosts computed in this process (the all-gather is a stack)."""
    files = data.text_files(path)
    cuts = data.plan_cuts(files, n)
    shares = [data.tokenise_share(data.host_pieces(files, cuts, q), tok, margin) for q in range(n)]
    seams = data.inner_cuts(cuts, files)
    windows = np.stack([data.seam_windows(s, seams, margin) for s in shares]) if seams else None
    owners = data.seam_owners(cuts, seams)
    return [data.finish_share(s, seams, windows, owners, data._affixes(tok), tok.eos_token_id, files)
            for s in shares], shares


@pytest.fixture(scope="module")
def tok(fixtures):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(fixtures.hf_dir)


def test_host_streams_join_into_the_one_process_stream(tmp_path, small_text, tok):
    """1, 2, 3 and 5 hosts: the streams joined in host order equal token_stream bitwise; the owned bytes cover
    the text once, about 1/n each; what a host reads past its share is the margins at cuts inside a document."""
    for name, path in texts(tmp_path, small_text).items():
        ref = data.token_stream(path, tok)
        total = sum(os.path.getsize(f) for f in data.text_files(path))
        for n in (1, 2, 3, 5):
            streams, shares = simulate(path, tok, n, margin=1024)
            np.testing.assert_array_equal(np.concatenate(streams), ref, err_msg=f"{name}, {n} hosts")
            owned = [s.owned_bytes for s in shares]
            assert sum(owned) == total, (name, n, owned)
            if name != "dir":  # one document: cut at line starts, within a line (< 200 bytes) of total/n
                assert max(abs(o - total / n) for o in owned) < 200, (name, n, owned)
            for s in shares:
                cut_inside = sum((p.start > 0) + (p.stop < p.size) for p in s.pieces)
                assert s.owned_bytes <= s.read_bytes <= s.owned_bytes + cut_inside * (1024 + 3), (name, n)
    # the directory on 3 hosts: both cuts fall inside document c (bytes 6000..31000 of 40000)
    files = data.text_files(path if name == "dir" else tmp_path / "docs")
    cuts = data.plan_cuts(files, 3)
    assert [[Path(p.path).name for p in data.host_pieces(files, cuts, q)] for q in range(3)] == [
        ["a.txt", "b.txt", "c.txt"], ["c.txt"], ["c.txt", "d.txt"]]

WORKER = textwrap.dedent('''
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    import numpy as np
    from transformers import AutoTokenizer
    from jaxprune import data
    from jaxprune.meshes import ShardingRules, make_mesh
    from jaxprune.sharding import Placement, to_host

    tok = AutoTokenizer.from_pretrained(sys.argv[3])
    texts, out = json.loads(sys.argv[4]), sys.argv[5]
    placement = Placement(make_mesh("data=2,fsdp=2"), ShardingRules())
    result = {}
    for name, path in texts.items():
        blocks = data.training_blocks(path, tok, %(seq)d, seed=%(seed)d)
        assert isinstance(blocks, data.HostBlocks)
        got = {}
        for step in range(6):  # 3 epochs of a small text pass by: the per-epoch shuffle is exercised
            batch = placement.put_batch(blocks.batch(step, 8).reshape(2, 4, -1), 1)  # [grad_accum, batch, seq]
            assert batch.sharding == placement.batch_sharding((2, 4, %(seq)d), 1)
            got[f"train{step}"] = to_host(batch)
        val = blocks.val[:6]
        got["val0"] = to_host(placement.put_batch(val[0:4], 0, strict=False))  # sharded on data x fsdp
        got["val1"] = to_host(placement.put_batch(val[4:6], 0, strict=False))  # 2 rows: replicated
        got["calib"] = blocks.calibration(5, 16, seed=1)
        # a mesh whose flat order interleaves the hosts' devices (0, 2, 1, 3): each host's rows are not one
        # range of the packed array, so the packing takes the per-device path
        devs = np.asarray(jax.devices())[[0, 2, 1, 3]].reshape(4, 1, 1)
        assert [d.process_index for d in devs.flat] == [0, 1, 0, 1]
        mixed = Placement(jax.sharding.Mesh(devs, ("data", "fsdp", "tensor")), ShardingRules())
        got["mixed"] = to_host(mixed.put_batch(blocks.batch(1, 8), 0))
        got["counts"] = np.asarray([blocks.n_train, blocks.n_val])
        np.savez(f"{out}/{name}-{jax.process_index()}.npz", **got)
        s = blocks.stats
        result[name] = {"owned_bytes": s.owned_bytes, "read_bytes": s.read_bytes, "tokens": s.tokens}
    with open(f"{out}/stats-{jax.process_index()}.json", "w") as f:
        json.dump(result, f)
''' % {"seq": SEQ, "seed": SEED})


def test_two_processes_assemble_the_one_process_batches(tmp_path, small_text, tok, fixtures):
    """2 processes × 2 CPU devices (gloo), mesh data=2,fsdp=2: 6 training batches [2, 4, 32] (and one on a mesh
    interleaving the hosts' devices), two validation slices and calibration samples, gathered back to the host,
    equal the one-process Blocks bitwise, for one file, a \\r\\n file and a directory of documents; each host
    tokenised about half the text (owned bytes sum to the text's, tokens to the one-process stream's)."""
    paths = texts(tmp_path, small_text)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, worker, f"127.0.0.1:{port}", str(i), str(fixtures.hf_dir),
                               json.dumps({k: str(v) for k, v in paths.items()}), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    for name, path in paths.items():
        stream = data.token_stream(path, tok)
        ref = data.Blocks.from_stream(stream, SEQ, seed=SEED)
        want = {f"train{s}": ref.batch(s, 8).reshape(2, 4, -1) for s in range(6)}
        want.update(mixed=ref.batch(1, 8), val0=ref.val[0:4], val1=ref.val[4:6], calib=ref.calibration(5, 16, seed=1),
                    counts=np.asarray([len(ref.train), len(ref.val)]))
        for i in range(2):
            got = np.load(tmp_path / f"{name}-{i}.npz")
            assert sorted(got.files) == sorted(want)
            for k, v in want.items():
                assert got[k].dtype == np.int32 or k == "counts", (name, k, got[k].dtype)
                np.testing.assert_array_equal(got[k], v, err_msg=f"{name}: {k} on process {i}")
        stats = [json.loads((tmp_path / f"stats-{i}.json").read_text())[name] for i in range(2)]
        total = sum(os.path.getsize(f) for f in data.text_files(path))
        assert sum(s["owned_bytes"] for s in stats) == total, (name, stats)
        assert sum(s["tokens"] for s in stats) == len(stream), (name, stats)
        for s in stats:
            # about half each: within one line (file) or one document's part (dir: cut inside document c)
            assert abs(s["owned_bytes"] - total / 2) < 200, (name, stats, total)
            assert s["read_bytes"] <= s["owned_bytes"] + data.MARGIN + 3, (name, stats)
