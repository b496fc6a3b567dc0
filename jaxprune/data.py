"""Text -> token blocks: `datasets` text loader over local files, tokenized once and cached.

* ``token_stream(files, tokenizer)``: one int32 stream (documents joined by EOS), cached by datasets'
  fingerprinting (a second call with the same files and tokenizer is a cache hit).
* ``Blocks``: the stream packed into ``seq_len`` blocks, a held-out validation split, and a
  deterministic shuffle: ``batch(step)`` depends only on (seed, step), which makes resume exact.
* ``calibration(n, length, seed)``: n sequences of ``length`` tokens from the training blocks.

* ``training_blocks(path, tokenizer, seq_len, seed)``: ``Blocks`` on one process; with N processes
  ``host_blocks``, where each host reads and tokenises only its share of the text and the global batches are
  assembled from the rows each host holds (``jax.make_array_from_process_local_data``), bitwise the
  one-process data:

* **Shares.** The documents (the .txt files, sorted, as ``text_files``) are laid end to end as one byte
  range, cut into N nearly equal parts. A cut inside a document moves forward to the next line start (a cut
  between documents needs nothing more: each document is tokenised on its own in the one-process run too).
  Host p opens only the files its part touches, and reads only its byte range plus a ``margin`` (4 KiB) on
  each side of a cut inside a document.
* **Cuts inside a document.** Both hosts beside such a cut tokenise the text around it (with offsets); the
  one on the left up to ``cut + margin``, the one on the right from ``cut - margin``. Away from the ends of
  the text it is given, a BPE / SentencePiece tokenisation equals the whole document's (it depends on a
  few characters around each token only). The two hosts exchange the tokens within ``margin // 16``
  characters of the cut (``process_allgather``, a few KiB) and take as the seam the first position at or
  after the cut where both tokenisations start a token and agree on the 4 tokens before and after it: the
  left host keeps its tokens before the seam, the right host its tokens from the seam. No such position:
  an error (split the text into several files). Documents cut this way need a fast tokenizer (offsets);
  with a slow one, cuts move to document boundaries.
* **Blocks.** Hosts exchange their token counts; block k (tokens ``[k·L, (k+1)·L)`` of the global stream)
  belongs to the host whose tokens it starts in (the tail of a block that runs past a host's tokens comes
  from the heads the hosts exchange once). Train / validation split and the per-epoch shuffle are
  ``Blocks``' own, from the global counts, so ``batch(step)`` names the same global blocks as on one process.
* **Batches.** ``HostBlocks.batch(step, n)`` is a ``HostRows``: the global block ids of the batch.
  ``Placement.put_batch`` calls its ``to_global(sharding)``: each host packs the rows it owns, the packs form
  one array over all devices (``jax.make_array_from_process_local_data``), and one jitted gather puts every
  row where the batch's sharding wants it (an int32 all-to-all of one batch per step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from .errors import UserError
from .sharding import put_global


def text_files(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    files = sorted(str(f) for f in p.glob("*.txt")) if p.is_dir() else [str(p)]
    if not files:
        raise UserError(f"{p}: directory holds no .txt files")
    return files


def token_stream(path: str | Path, tokenizer) -> np.ndarray:
    """All documents of ``path`` (a .txt file or a dir of them) as one int32 token stream."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("text", data_files=text_files(path), sample_by="document", split="train")
    eos = tokenizer.eos_token_id
    tokenizer.model_max_length = 10**12

    def tok(batch):
        ids = tokenizer(batch["text"])["input_ids"]
        return {"ids": [x + [eos] if eos is not None else x for x in ids]}

    ds = ds.map(tok, batched=True, remove_columns=["text"])
    return np.concatenate([np.asarray(x, np.int32) for x in ds["ids"]])


@dataclass
class Blocks:
    """Token blocks [n, seq_len] split into train / validation, with a seeded per-epoch shuffle."""

    train: np.ndarray
    val: np.ndarray
    seed: int = 0

    @classmethod
    def from_stream(cls, stream: np.ndarray, seq_len: int, *, val_fraction: float = 0.05, seed: int = 0,
                    min_val_blocks: int = 1) -> "Blocks":
        n_train, n_val = split_counts(len(stream), seq_len, val_fraction, min_val_blocks)
        n = n_train + n_val
        blocks = stream[: n * seq_len].reshape(n, seq_len)
        # validation = the last blocks of the stream (contiguous text, never trained on)
        return cls(train=blocks[:n_train], val=blocks[n_train:], seed=seed)

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        """The [batch_size, seq_len] batch of global step ``step``: a function of (seed, step) only."""
        return self.train[batch_indices(self.seed, len(self.train), step, batch_size)]

    def calibration(self, n: int, length: int, seed: int = 0) -> np.ndarray:
        """n sequences of ``length`` tokens sampled from the training blocks: [n, length]."""
        if length > self.train.shape[1]:
            raise UserError(f"calibration length {length} exceeds the block length {self.train.shape[1]}")
        rng = np.random.default_rng(seed)
        rows = rng.integers(0, len(self.train), n)
        starts = rng.integers(0, self.train.shape[1] - length + 1, n)
        return np.stack([self.train[r, s:s + length] for r, s in zip(rows, starts)])


def split_counts(n_tokens: int, seq_len: int, val_fraction: float = 0.05, min_val_blocks: int = 1) -> tuple[int, int]:
    """(train blocks, validation blocks) of a stream of ``n_tokens`` tokens cut into ``seq_len`` blocks."""
    n = n_tokens // seq_len
    if n < 2:
        raise UserError(f"text too short: {n_tokens} tokens make fewer than 2 blocks of seq-len {seq_len}")
    n_val = max(min_val_blocks, int(round(n * val_fraction)))
    n_val = min(n_val, n - 1)
    return n - n_val, n_val


def batch_indices(seed: int, n_train: int, step: int, batch_size: int) -> np.ndarray:
    """The training blocks of ``Blocks.batch(step, batch_size)``: a new permutation of the ``n_train`` blocks
    per epoch, seeded by (seed, epoch). [batch_size] int64."""
    idx = np.empty(batch_size, np.int64)
    for j in range(batch_size):
        k = step * batch_size + j
        epoch, pos = divmod(k, n_train)
        perm = np.random.default_rng((seed, epoch)).permutation(n_train)
        idx[j] = perm[pos]
    return idx


# ---- per-host data -----------------------------------------------------------------------------
MARGIN = 4096  # bytes read on each side of a cut inside a document
CONTEXT = 4  # tokens that must agree on each side of a seam
_PAD = -(2**31)  # no token here (what hosts exchange is int32: jax without x64 would narrow int64)


def _newlines(s: str) -> str:
    """Python's universal newlines (what ``datasets``' text loader reads): \\r\\n and \\r -> \\n."""
    return s.replace("\r\n", "\n").replace("\r", "\n")


# ---- which bytes each host reads ----------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Bytes [start, stop) of document ``doc`` (file ``path`` of ``size`` bytes) that one host tokenises."""
    doc: int
    path: str
    size: int
    start: int
    stop: int


def plan_cuts(files: list[str], n: int, *, line_cuts: bool = True) -> list[tuple[int, int]]:
    """The N+1 cut points (document, byte offset) of ``files`` laid end to end, in order: host p reads from
    cut p to cut p+1. Inner cuts sit at line starts (``line_cuts``) or document boundaries (else)."""
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cuts = [(0, 0)]
    for i in range(1, n):
        g = total * i // n
        d = int(np.searchsorted(starts, g, side="right")) - 1
        d = min(d, len(files) - 1)
        o = g - int(starts[d])
        if 0 < o < sizes[d]:
            o = _next_line_start(files[d], o) if line_cuts else sizes[d]
        if o >= sizes[d] and d + 1 < len(files):  # at a document's end: the next one's start
            d, o = d + 1, 0
        cuts.append(max(cuts[-1], (d, o)))
    cuts.append((len(files) - 1, sizes[-1]) if files else (0, 0))
    return cuts


def _next_line_start(path: str, o: int) -> int:
    """The first q >= o with byte q-1 a newline (or the file's size)."""
    with open(path, "rb") as f:
        f.seek(o - 1)
        pos = o - 1
        while chunk := f.read(1 << 16):
            i = chunk.find(b"\n")
            if i >= 0:
                return pos + i + 1
            pos += len(chunk)
    return os.path.getsize(path)


def host_pieces(files: list[str], cuts: list[tuple[int, int]], p: int) -> list[Piece]:
    """The documents / parts of documents between cut p and cut p+1."""
    (d0, o0), (d1, o1) = cuts[p], cuts[p + 1]
    out = []
    for d in range(d0, d1 + 1):
        size = os.path.getsize(files[d])
        a = o0 if d == d0 else 0
        b = o1 if d == d1 else size
        if (d, a) == (d1, o1) and not (size == 0 and p == len(cuts) - 2 and d == d1):
            continue  # the next host's start (an empty last document goes to the last host)
        if a < b or size == 0:
            out.append(Piece(d, files[d], size, a, b))
    return out


# ---- tokenising a share -------------------------------------------------------------------------
@dataclass
class LocalShare:
    """One host's tokens before the seams are chosen: per piece its ids and start offsets (characters,
    relative to the piece's left / right cut), and what it read."""
    pieces: list[Piece]
    ids: list[np.ndarray]
    rel_left: list[np.ndarray | None]
    rel_right: list[np.ndarray | None]
    owned_bytes: int = 0
    read_bytes: int = 0


def _affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens ``tokenizer(text)`` puts before and after the text's own tokens."""
    with_ = list(tokenizer("a")["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for k in range(len(with_) - len(bare) + 1):
        if with_[k:k + len(bare)] == bare:
            return with_[:k], with_[k + len(bare):]
    raise UserError("per-host data: cannot tell the tokenizer's special tokens from its text tokens")


def tokenise_share(pieces: list[Piece], tokenizer, margin: int = MARGIN) -> LocalShare:
    """Read and tokenise one host's pieces: whole documents exactly as ``data.token_stream`` does; a cut
    document with offsets, ``margin`` bytes past each inner cut."""
    share = LocalShare(pieces, [], [], [])
    tokenizer.model_max_length = 10**12
    for pc in pieces:
        whole = pc.start == 0 and pc.stop == pc.size
        ra = 0 if pc.start == 0 else max(0, pc.start - margin)
        rb = pc.size if pc.stop == pc.size else min(pc.size, pc.stop + margin)
        with open(pc.path, "rb") as f:
            f.seek(ra)
            raw = f.read(min(pc.size, rb + 3) - ra)
        lo, hi = 0, rb - ra
        while ra + lo < pc.start and (raw[lo] & 0xC0) == 0x80:  # start on a character
            lo += 1
        while hi < len(raw) and (raw[hi] & 0xC0) == 0x80:  # end on a character
            hi += 1
        share.owned_bytes += pc.stop - pc.start
        share.read_bytes += hi - lo
        text = _newlines(raw[lo:hi].decode("utf-8"))
        if whole:
            share.ids.append(np.asarray(tokenizer(text)["input_ids"], np.int64))
            share.rel_left.append(None)
            share.rel_right.append(None)
            continue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64)
        if np.any(np.diff(starts) < 0):
            raise UserError("per-host data: the tokenizer's offsets are not in order; split the text into files")
        share.ids.append(np.asarray(enc["input_ids"], np.int64))
        pa = len(_newlines(raw[lo:pc.start - ra].decode("utf-8")))
        pb = len(_newlines(raw[lo:pc.stop - ra].decode("utf-8")))
        share.rel_left.append(starts - pa if pc.start > 0 else None)
        share.rel_right.append(starts - pb if pc.stop < pc.size else None)
    return share


def inner_cuts(cuts: list[tuple[int, int]], files: list[str]) -> list[tuple[int, int]]:
    """The distinct cuts that fall inside a document (those need a seam)."""
    out = []
    for d, o in cuts[1:-1]:
        if 0 < o < os.path.getsize(files[d]) and (d, o) not in out:
            out.append((d, o))
    return out


def _window_len(margin: int) -> int:
    return 8 * (margin // 16) + 2 * CONTEXT + 8


def seam_windows(share: LocalShare, seams: list[tuple[int, int]], margin: int = MARGIN) -> np.ndarray:
    """[len(seams), 2, K, 2] int32: per inner cut, this host's (offset, id) of the tokens within
    ``margin // 16`` characters of it, [.., 0, ..] as the cut's left host, [.., 1, ..] as its right host;
    padded with (_PAD, -1)."""
    w = margin // 16
    k = _window_len(margin)
    out = np.full((len(seams), 2, k, 2), -1, np.int32)
    out[..., 0] = _PAD
    for pc, ids, left, right in zip(share.pieces, share.ids, share.rel_left, share.rel_right):
        for side, rel, at in ((0, right, (pc.doc, pc.stop)), (1, left, (pc.doc, pc.start))):
            if rel is None or at not in seams:
                continue
            i0, i1 = np.searchsorted(rel, -w), np.searchsorted(rel, w)
            i1 = min(i1, i0 + k)
            s = seams.index(at)
            out[s, side, :i1 - i0, 0] = rel[i0:i1]
            out[s, side, :i1 - i0, 1] = ids[i0:i1]
    return out


def _seam(left: np.ndarray, right: np.ndarray) -> tuple[int, int] | None:
    """The offset (characters from the cut) of the first agreed seam at or after the cut: the first position
    where both windows start a token and agree on CONTEXT tokens before and after it; None if none."""
    a = [(int(o), int(t)) for o, t in left if o != _PAD]
    b = [(int(o), int(t)) for o, t in right if o != _PAD]
    pos_b = {}
    for j, (off, _) in enumerate(b):
        pos_b.setdefault(off, j)
    for i, (off, _) in enumerate(a):
        if off < 0 or (i > 0 and a[i - 1][0] == off) or off not in pos_b:
            continue
        j = pos_b[off]
        if i < CONTEXT or j < CONTEXT or i + CONTEXT > len(a) or j + CONTEXT > len(b):
            continue
        if a[i - CONTEXT:i + CONTEXT] == b[j - CONTEXT:j + CONTEXT]:
            return off
    return None


def finish_share(share: LocalShare, seams: list[tuple[int, int]], windows: np.ndarray,
                 owners: list[tuple[int, int]], affixes: tuple[list[int], list[int]], eos: int | None,
                 files: list[str]) -> np.ndarray:
    """This host's part of the global token stream (int32), given every host's ``seam_windows``
    (``windows``: [N, seams, 2, K, 2]) and each seam's (left host, right host)."""
    offsets = []
    for s, (lh, rh) in enumerate(owners):
        off = _seam(windows[lh, s, 0], windows[rh, s, 1])
        if off is None:
            d, o = seams[s]
            raise UserError(f"per-host data: {files[d]}: the tokenisation around byte {o} does not agree between "
                            f"hosts {lh} and {rh} near the cut; split the text into several .txt files")
        offsets.append(off)
    pre, post = affixes
    parts = []
    for pc, ids, left, right in zip(share.pieces, share.ids, share.rel_left, share.rel_right):
        if left is None and right is None:  # a whole document, tokenised as on one process
            parts.append(ids)
        else:
            i0 = 0 if left is None else int(np.searchsorted(left, offsets[seams.index((pc.doc, pc.start))]))
            i1 = len(ids) if right is None else int(np.searchsorted(right, offsets[seams.index((pc.doc, pc.stop))]))
            parts.append(np.asarray((pre if pc.start == 0 else []) + list(ids[i0:i1])
                                    + (post if pc.stop == pc.size else []), np.int64))
        if pc.stop == pc.size and eos is not None:
            parts.append(np.asarray([eos], np.int64))
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def seam_owners(cuts: list[tuple[int, int]], seams: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(left host, right host) of each inner cut: the hosts owning the bytes before and after it."""
    out = []
    for s in seams:
        right = max(p for p in range(len(cuts) - 1) if cuts[p] <= s)
        left = max(p for p in range(len(cuts) - 1) if cuts[p] < s)
        out.append((left, right))
    return out


@dataclass
class ShareStats:
    """What one host read: bytes of text it owns, bytes it read (owned + margins), tokens it produced."""
    owned_bytes: int
    read_bytes: int
    tokens: int


def host_token_stream(path, tokenizer, *, process_index: int, process_count: int,
                      allgather: Callable[[np.ndarray], np.ndarray], margin: int = MARGIN
                      ) -> tuple[np.ndarray, ShareStats]:
    """Host ``process_index``'s part of ``data.token_stream(path, tokenizer)``: concatenated over the hosts in
    order it is the one-process stream. ``allgather(x)`` -> [process_count, *x.shape] (every host calls it
    once, with arrays of one shape)."""
    files = text_files(path)
    cuts = plan_cuts(files, process_count, line_cuts=bool(getattr(tokenizer, "is_fast", False)))
    share = tokenise_share(host_pieces(files, cuts, process_index), tokenizer, margin)
    seams = inner_cuts(cuts, files)
    windows = allgather(seam_windows(share, seams, margin)) if seams else None
    stream = finish_share(share, seams, windows, seam_owners(cuts, seams), _affixes(tokenizer),
                          tokenizer.eos_token_id, files)
    return stream, ShareStats(share.owned_bytes, share.read_bytes, len(stream))


def process_allgather(x: np.ndarray) -> np.ndarray:
    """[process_count, *x.shape]: every process's ``x`` (``multihost_utils.process_allgather``)."""
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


# ---- global blocks from per-host streams ------------------------------------------------------
@dataclass
class HostBlocks:
    """``data.Blocks`` over per-host token streams: the same train / validation blocks and shuffle, each block
    held by one host. ``train`` / ``val`` are ``RowRange`` views (shape, len, slices of ``HostRows``);
    ``batch`` gives ``HostRows``, which ``Placement.put_batch`` lays out with ``HostRows.to_global``."""
    mine: np.ndarray  # [blocks this host owns, seq_len]
    first: np.ndarray  # [process_count + 1]: host p owns global blocks [first[p], first[p+1])
    n_train: int
    n_val: int
    seed: int
    process_index: int
    stats: ShareStats | None = None
    allgather: Callable = field(default=process_allgather, repr=False)

    @classmethod
    def from_local_stream(cls, stream: np.ndarray, seq_len: int, *, seed: int = 0, val_fraction: float = 0.05,
                          min_val_blocks: int = 1, process_index: int | None = None,
                          allgather: Callable = process_allgather, stats: ShareStats | None = None) -> "HostBlocks":
        """Exchange the hosts' token counts and first ``seq_len`` tokens, then own the blocks that start in
        this host's tokens."""
        p = jax.process_index() if process_index is None else process_index
        head = np.zeros(seq_len, np.int32)
        head[:min(seq_len, len(stream))] = stream[:seq_len]
        info = allgather(np.concatenate([divmod(len(stream), 2**30), head]).astype(np.int32))  # int32: see _PAD
        lengths, heads = info[:, 0].astype(np.int64) * 2**30 + info[:, 1], info[:, 2:]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        n_train, n_val = split_counts(int(starts[-1]), seq_len, val_fraction, min_val_blocks)
        n = n_train + n_val
        first = np.minimum(-(-starts // seq_len), n)  # the first block starting at or after each host's start
        first[-1] = n
        k0, k1 = int(first[p]), int(first[p + 1])
        need = (k1 * seq_len) - int(starts[p])  # tokens from this host's start to its last block's end
        tail = [stream]
        for q in range(p + 1, len(lengths)):
            if sum(map(len, tail)) >= need:
                break
            tail.append(heads[q][:min(int(lengths[q]), seq_len)])
        local = np.concatenate(tail)[k0 * seq_len - int(starts[p]):need]
        return cls(local.reshape(k1 - k0, seq_len), first, n_train, n_val, seed, p, stats, allgather)

    @property
    def seq_len(self) -> int:
        return self.mine.shape[1]

    @property
    def train(self) -> "RowRange":
        return RowRange(self, 0, self.n_train)

    @property
    def val(self) -> "RowRange":
        return RowRange(self, self.n_train, self.n_train + self.n_val)

    def owner(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first, rows, side="right") - 1

    def batch(self, step: int, batch_size: int) -> "HostRows":
        """The global batch of ``step`` (``Blocks.batch``'s blocks), as global block ids."""
        return HostRows(self, batch_indices(self.seed, self.n_train, step, batch_size), (batch_size, self.seq_len))

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Global blocks ``rows`` as a numpy array [len(rows), seq_len] on every host (an all-gather)."""
        rows = np.asarray(rows, np.int64)
        mask = self.owner(rows) == self.process_index
        local = np.zeros((len(rows), self.seq_len), np.int32)
        local[mask] = self.mine[rows[mask] - self.first[self.process_index]]
        everyone = self.allgather(local)
        return everyone[self.owner(rows), np.arange(len(rows))]

    def calibration(self, n: int, length: int, seed: int = 0) -> np.ndarray:
        """``Blocks.calibration``: n sequences of ``length`` tokens from the training blocks, on every host."""
        if length > self.seq_len:
            raise UserError(f"calibration length {length} exceeds the block length {self.seq_len}")
        rng = np.random.default_rng(seed)
        rows = rng.integers(0, self.n_train, n)
        starts = rng.integers(0, self.seq_len - length + 1, n)
        full = self.gather_rows(rows)
        return np.stack([full[i, s:s + length] for i, s in enumerate(starts)])


@dataclass(frozen=True)
class RowRange:
    """Global blocks [lo, hi) of a ``HostBlocks`` (its ``train`` / ``val``): shape, len, slices."""
    blocks: HostBlocks
    lo: int
    hi: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.hi - self.lo, self.blocks.seq_len)

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, sl: slice) -> "HostRows":
        rows = np.arange(self.lo, self.hi)[sl]
        return HostRows(self.blocks, rows, (len(rows), self.blocks.seq_len))

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype)


@dataclass(frozen=True, eq=False)
class HostRows:
    """A global batch named by global block ids, ``shape`` = its array shape (a reshape of [len(rows), L])."""
    blocks: HostBlocks
    rows: np.ndarray
    shape: tuple[int, ...]

    def reshape(self, *shape) -> "HostRows":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return HostRows(self.blocks, self.rows, np.empty(self.shape, np.bool_).reshape(shape).shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice) -> "HostRows":
        assert len(self.shape) == 2, "slice a [n, seq_len] batch"
        rows = self.rows[sl]
        return HostRows(self.blocks, rows, (len(rows), self.shape[1]))

    def __array__(self, dtype=None, copy=None):
        """Every row on every host (an all-gather): for callers that want numpy."""
        return np.asarray(self.blocks.gather_rows(self.rows).reshape(self.shape), dtype)

    def to_global(self, sharding: NamedSharding) -> jax.Array:
        """The batch as a global array with ``sharding``. Each host packs the rows it owns (in batch order) onto
        its devices of ``sharding.mesh`` (``S`` rows per device), the packs form one [devices·S, L] array
        (``jax.make_array_from_process_local_data``), and a jitted gather reorders it into the batch."""
        b, mesh = self.blocks, sharding.mesh
        owners = b.owner(self.rows)
        devs = list(mesh.devices.flat)
        procs = np.asarray([d.process_index for d in devs])
        nproc = len(b.first) - 1
        slots = [np.flatnonzero(procs == q) for q in range(nproc)]  # each host's device positions in the mesh
        counts = np.bincount(owners, minlength=nproc)
        per_dev = max(1, max(-(-int(c) // max(len(s), 1)) for c, s in zip(counts, slots)))
        src = np.empty(len(self.rows), np.int64)  # each batch row's row in the packed array
        for q in range(nproc):
            at = np.flatnonzero(owners == q)
            pos = np.arange(len(at))
            if len(at):
                src[at] = slots[q][pos // per_dev] * per_dev + pos % per_dev
        me = b.process_index
        mine = np.flatnonzero(owners == me)
        local = np.zeros((len(slots[me]) * per_dev, b.seq_len), np.int32)
        local[:len(mine)] = b.mine[self.rows[mine] - b.first[me]]
        axes = tuple(mesh.axis_names)
        packed_sharding = NamedSharding(mesh, P(axes))
        shape = (len(devs) * per_dev, b.seq_len)
        if len(slots[me]) and np.all(np.diff(slots[me]) == 1):  # this host's devices hold one row range
            packed = jax.make_array_from_process_local_data(packed_sharding, local, shape)
        else:
            by_dev = {devs[int(f)]: local[k * per_dev:(k + 1) * per_dev] for k, f in enumerate(slots[me])}
            packed = jax.make_array_from_single_device_arrays(
                shape, packed_sharding, [jax.device_put(by_dev[d], d) for d in packed_sharding.addressable_devices])
        index = put_global(src.astype(np.int32), NamedSharding(mesh, P()))
        return _gather(sharding, self.shape)(packed, index)


_GATHERS: dict = {}


def _gather(sharding: NamedSharding, shape: tuple[int, ...]):
    """jit(packed[index].reshape(shape)) with ``sharding`` on the output (one compile per batch shape)."""
    key = (sharding, shape)
    if key not in _GATHERS:
        _GATHERS[key] = jax.jit(lambda packed, index: packed[index].reshape(shape), out_shardings=sharding)
    return _GATHERS[key]


def host_blocks(path, tokenizer, seq_len: int, *, seed: int = 0, margin: int = MARGIN) -> HostBlocks:
    """``Blocks.from_stream(token_stream(path, tokenizer), seq_len, seed=seed)`` over ``jax.process_count()``
    hosts, each reading and tokenising its share (all processes call it)."""
    stream, stats = host_token_stream(path, tokenizer, process_index=jax.process_index(),
                                      process_count=jax.process_count(), allgather=process_allgather, margin=margin)
    return HostBlocks.from_local_stream(stream, seq_len, seed=seed, stats=stats)


def training_blocks(path, tokenizer, seq_len: int, *, seed: int = 0) -> "Blocks | HostBlocks":
    """The training text as blocks: ``Blocks.from_stream(token_stream(...))`` on one process, ``host_blocks`` (each
    host reads and tokenises its share; the same blocks and batches) on several."""
    if jax.process_count() == 1:
        return Blocks.from_stream(token_stream(path, tokenizer), seq_len, seed=seed)
    return host_blocks(path, tokenizer, seq_len, seed=seed)
