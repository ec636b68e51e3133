"""Write tests/data/release_0_1/: a store, SAEs and a mid-run checkpoint made by release 0.1.

Run it with the code of the release the fixtures stand for, not the working tree (the
editable install points at the working tree), from a directory outside the repository:

    cd /tmp && PYTHONPATH=/path/to/release-0.1-checkout OMP_NUM_THREADS=1 \
        python /path/to/repo/scripts/make_release_fixtures.py --out /path/to/repo/tests/data/release_0_1

``tests/test_old_release.py`` then checks that the current code reads these files and
computes the same numbers, bit for bit. What it writes (about 0.5 MB in all):

- ``store/``: 768 rows of ``tiny-stdlib`` at ``blocks.1.hook_resid_post`` on the stdlib
  corpus (bfloat16, two shards), written by ``harvest``; ``store_expected.json`` and
  ``store_expected.safetensors``: what the reader returned (properties, checksums of every
  row, token and context, the first rows and rows across a shard boundary, and the row
  order of ``reader()`` batches).
- ``saes/ARCH/``: ``cfg.json`` + ``sae.safetensors`` for every architecture in the registry,
  each trained a few steps on the store by ``train``; ``sae_expected.safetensors``: the input
  ``x`` (the store's first rows, raw) and each SAE's ``ARCH.encoded`` = encode(x) and
  ``ARCH.decoded`` = decode(encode(x)).
- ``resume/``: a TopK run stopped midway: ``checkpoint/`` is a copy of the checkpoint the run
  wrote at step ``RESUME_STEP`` (its meta.json holds the full TrainConfig, with the store
  recorded as the relative path ``store``), and ``final/`` the ``cfg.json`` +
  ``sae.safetensors`` the same run ended with, uninterrupted. Small batches and a short
  ``dead_tokens`` keep AuxK busy on both sides of the checkpoint, and the rest of the run
  crosses into the store's second epoch and through the learning-rate decay. Before writing
  anything the script resumes from the copy in a fresh directory and checks that it ends
  byte-identical.
- ``platform_probe.json``: sha256 of a few plain torch matmuls on the fixtures' own tensors,
  at the shapes the SAEs use. Matmul rounding depends on the CPU code path the BLAS picks
  (MKL on an AVX2 machine rounds differently from AVX-512), so the test compares bits only
  where this probe shows the same rounding, and otherwise falls back to a tight tolerance.
- ``provenance.json``: the release's git commit, library versions, the CPU, the command.

Imports are package-level (``from llm_sae.train import Trainer``), names that both the flat
0.1 modules and the later packages export, so the script runs unchanged with either.

Everything runs on the CPU on one thread with fixed seeds, so the same machine writes the
same bytes on every run. The numbers are exact float32 arithmetic of this torch build on
this CPU; ``provenance.json`` records both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import llm_sae  # noqa: E402

# The store.
MODEL, HOOK, DATASET = "tiny-stdlib", "blocks.1.hook_resid_post", "stdlib"
STORE_ROWS, CONTEXT, HARVEST_BATCH, SHARD_ROWS, STORE_DTYPE = 768, 64, 8, 256, "bfloat16"
# The SAEs: tiny, to keep the fixtures small (d_in is the model's 128).
N_LATENTS, K, BATCH, SAE_STEPS, SEED = 16, 4, 64, 12, 7
# LISTA's default l1_coef leaves almost every latent of the fixture input at 0 after so few
# steps, which would make its encode check (and the lateral steps) trivial.
ARCH_OVERRIDES = {"lista": {"l1_coef": 1.0}}
# The resumed TopK run: batches of 8 (96 an epoch), so with dead_tokens one batch some latents
# are dead at most steps and AuxK trains them; a checkpoint every RESUME_STEP steps, and the
# copy is the first one. The rest of the run crosses into epoch 2 (step 96) and the lr decay.
RESUME_STEPS, RESUME_STEP, RESUME_BATCH, RESUME_DEAD_TOKENS = 120, 60, 8, 8
# Expected outputs: the store's first rows; reader row orders: this many batches.
X_ROWS, STORE_HEAD_ROWS, READER_BATCHES = 8, 16, 20


def sha256(t: torch.Tensor) -> str:
    """Of the tensor's bytes, C order (bfloat16 as its 16-bit patterns)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_store(work: Path) -> Path:
    from llm_sae.harvest import HarvestConfig, harvest

    harvest(HarvestConfig(
        model=MODEL, hook=[HOOK], dataset=DATASET, tokens=STORE_ROWS, out="store",
        context_length=CONTEXT, batch_size=HARVEST_BATCH, device="cpu", dtype=STORE_DTYPE,
        shard_rows=SHARD_ROWS, progress=False,
    ))
    return work / "store"


def store_expectations(store_dir: Path, out: Path) -> None:
    """What the reader returns: properties, checksums, some rows, reader batch orders."""
    from llm_sae.store import open_store, verify_store

    assert verify_store(store_dir) == []
    s = open_store(store_dir)
    n = s.n_rows
    assert len(s.shards) >= 2, "the fixture store should have several shards"
    boundary = int(s.shards[0]["rows"])
    seq_ids = torch.unique(s.positions(0, n)[:, 0])
    tensors = {
        "acts_head": s.acts(0, STORE_HEAD_ROWS),
        "acts_boundary": s.acts(boundary - 8, boundary + 8),  # rows from two shards
        "token_ids_head": s.token_ids(0, STORE_HEAD_ROWS),
        "positions_head": s.positions(0, STORE_HEAD_ROWS),
        "sequence_tokens_head": s.sequence_tokens(seq_ids[:2]),
        "mean": s.mean,
    }
    readers = {
        # name: (batch_size, kwargs): the default order, and the training run's
        "default": (BATCH, {}),
        "train": (BATCH, {"seed": SEED, "loop": True}),
    }
    reader_meta = {}
    for name, (bs, kw) in readers.items():
        rows, xs = [], []
        it = iter(s.reader(bs, with_rows=True, **kw))
        try:
            for _ in range(READER_BATCHES if kw.get("loop") else n // bs):
                x_BD, rows_B = next(it)
                rows.append(rows_B)
                xs.append(x_BD)
        finally:
            it.close()
        tensors[f"reader_{name}_rows"] = torch.stack(rows).to(torch.int32)
        reader_meta[name] = {"batch_size": bs, **kw, "batches": len(rows),
                             "x_sha256": sha256(torch.stack(xs)), "x_dtype": str(xs[0].dtype)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "store_expected.safetensors"))
    meta = {
        "n_rows": n, "d_in": s.d_in, "dtype": str(s.dtype), "hook": s.hook, "model": s.model,
        "context_length": s.context_length, "mean_norm": s.mean_norm, "n_shards": len(s.shards),
        "shard_rows": [int(sh["rows"]) for sh in s.shards], "n_sequences": int(seq_ids.numel()),
        "sequence_ids_head": seq_ids[:2].tolist(), "boundary_row": boundary,
        "sha256": {
            "acts": sha256(s.acts(0, n)), "token_ids": sha256(s.token_ids(0, n)),
            "positions": sha256(s.positions(0, n)), "sequence_tokens": sha256(s.sequence_tokens(seq_ids)),
        },
        "readers": reader_meta,
    }
    (out / "store_expected.json").write_text(json.dumps(meta, indent=1) + "\n")


def train_cfg(arch: str, out: str, steps: int, batch: int = BATCH, **kw):
    from llm_sae.train import TrainConfig

    return TrainConfig(store="store", out=out, arch=arch, n_latents=N_LATENTS, k=K,
                       tokens=steps * batch, batch_size=batch, device="cpu", seed=SEED,
                       log_every=10**9, **kw)


def make_saes(store_dir: Path, out: Path) -> list[str]:
    """Every registered arch, trained SAE_STEPS steps; their outputs on the store's first rows."""
    from llm_sae.sae import REGISTRY, load_sae
    from llm_sae.store import open_store
    from llm_sae.train import find_checkpoint, read_checkpoint_meta, train

    archs = sorted(REGISTRY)
    x_BD = open_store(store_dir).acts(0, X_ROWS).float()
    expected = {"x": x_BD}
    for arch in archs:
        run = train(train_cfg(arch, f"runs/{arch}", SAE_STEPS, **ARCH_OVERRIDES.get(arch, {})))
        assert read_checkpoint_meta(find_checkpoint(run))["step"] == SAE_STEPS
        dest = out / "saes" / arch
        dest.mkdir(parents=True)
        for name in ("cfg.json", "sae.safetensors"):
            shutil.copy2(run / name, dest / name)
        sae = load_sae(dest)
        with torch.no_grad():
            z_BN = sae.encode(x_BD)
            x_hat_BD = sae.decode(z_BN)
            # The reference must be reproducible: a second call gives the same bits.
            z2_BN = sae.encode(x_BD.clone())
            assert torch.equal(z_BN, z2_BN) and torch.equal(sae.decode(z2_BN), x_hat_BD), arch
        active_B = (z_BN != 0).sum(-1)
        assert int((active_B > 0).sum()) >= X_ROWS // 2, f"{arch}: few latents fire on the input: {active_B}"
        expected[f"{arch}.encoded"] = z_BN.contiguous()
        expected[f"{arch}.decoded"] = x_hat_BD.contiguous()
    save_file(expected, str(out / "sae_expected.safetensors"))
    return archs


def make_resume(out: Path) -> dict:
    """A TopK run with checkpoints; a copy of its mid-run checkpoint and its final SAE."""
    from llm_sae.train import TrainConfig, Trainer, read_checkpoint_meta, train

    dest = out / "resume"
    dest.mkdir()
    copied = []
    original = Trainer.save_checkpoint

    def save_and_copy(self, path):  # observes only: the run itself is unchanged
        p = original(self, path)
        if self.step_idx == RESUME_STEP and not copied:
            shutil.copytree(p, dest / "checkpoint")
            copied.append(self.step_idx)
        return p

    cfg = train_cfg("topk", "runs/resume", RESUME_STEPS, batch=RESUME_BATCH,
                    checkpoint_every=RESUME_STEP * RESUME_BATCH, dead_tokens=RESUME_DEAD_TOKENS)
    Trainer.save_checkpoint = save_and_copy
    try:
        run = train(cfg)
    finally:
        Trainer.save_checkpoint = original
    assert copied == [RESUME_STEP], copied
    (dest / "final").mkdir()
    for name in ("cfg.json", "sae.safetensors"):
        shutil.copy2(run / name, dest / "final" / name)

    # The old code itself must resume from the copy to the same bytes, from the checkpoint's
    # own record of the config, in a directory that never saw the run.
    meta = read_checkpoint_meta(dest / "checkpoint")
    assert meta["step"] == RESUME_STEP and meta["train"]["store"] == "store", meta
    state = torch.load(dest / "checkpoint" / "state.pt", weights_only=False)
    dead_N = state["tokens_since_fired_N"] >= RESUME_DEAD_TOKENS
    assert bool(dead_N.any()), "no latent is dead at the checkpoint: the fixture misses AuxK"
    fresh = Path("runs/resume_check")
    shutil.copytree(dest / "checkpoint", fresh / "checkpoint")
    d = dict(meta["train"], out=str(fresh))
    d["adam_betas"] = tuple(d["adam_betas"])
    again = train(TrainConfig(**d))
    for name in ("sae.safetensors", "cfg.json"):
        assert (again / name).read_bytes() == (dest / "final" / name).read_bytes(), (
            f"resuming from the step-{RESUME_STEP} checkpoint does not reproduce {name}")
    return {"steps": RESUME_STEPS, "checkpoint_step": RESUME_STEP, "batch_size": RESUME_BATCH,
            "dead_tokens": RESUME_DEAD_TOKENS, "dead_at_checkpoint": int(dead_N.sum())}


def platform_probe(fix: Path) -> dict[str, str]:
    """sha256 of plain torch matmuls on the fixtures' tensors, at the SAEs' shapes.

    tests/test_old_release.py repeats this code exactly: equal hashes there mean that
    machine's BLAS rounds these products as this one did.
    """
    import torch.nn.functional as F
    from safetensors.torch import load_file

    acts = np.load(fix / "store" / "shard-00000.acts.npy")[:64]
    xs_BD = torch.from_numpy(acts.astype(np.uint16).view(np.int16)).view(torch.bfloat16).float()
    x_BD = load_file(str(fix / "sae_expected.safetensors"))["x"]
    out = {}
    for arch in sorted(p.name for p in (fix / "saes").iterdir()):
        w = load_file(str(fix / "saes" / arch / "sae.safetensors"))
        pre_BN = F.linear(x_BD - w["b_dec"], w["W_enc"], w["b_enc"])
        out[f"{arch}.pre"] = sha256(pre_BN)
        out[f"{arch}.dec"] = sha256(torch.relu(pre_BN) @ w["W_dec"] + w["b_dec"])
        for B in (8, 64):
            s_BN = F.linear(xs_BD[:B], w["W_enc"])
            out[f"{arch}.enc{B}"] = sha256(s_BN)
            out[f"{arch}.grad{B}"] = sha256(s_BN.T @ xs_BD[:B])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (replaced), e.g. tests/data/release_0_1")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(llm_sae.__file__).resolve().parent.parent
    print(f"llm_sae from {llm_sae.__file__}", file=sys.stderr)
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="release_fixtures_") as tmp:
        work, stage = Path(tmp) / "work", Path(tmp) / "out"
        work.mkdir()
        stage.mkdir()
        cwd = os.getcwd()
        os.chdir(work)  # relative paths ("store", "runs/...") end up in the configs
        try:
            store_dir = make_store(work)
            shutil.copytree(store_dir, stage / "store")
            store_expectations(stage / "store", stage)
            archs = make_saes(store_dir, stage)
            resume = make_resume(stage)
            probe = platform_probe(stage)
            (stage / "platform_probe.json").write_text(json.dumps(probe, indent=1) + "\n")
        finally:
            os.chdir(cwd)
        dirty = git(root, "status", "--porcelain", "--untracked-files=no")
        provenance = {
            "what": "fixtures written by llm_sae release 0.1, read by tests/test_old_release.py",
            "llm_sae_commit": git(root, "rev-parse", "HEAD"),
            "llm_sae_tree_clean": dirty == "",
            "llm_sae_version": getattr(llm_sae, "__version__", None),
            "command": (f"cd /tmp && PYTHONPATH=<checkout of {git(root, 'rev-parse', '--short', 'HEAD')}> "
                        f"OMP_NUM_THREADS=1 python scripts/make_release_fixtures.py --out tests/data/release_0_1"),
            "argv": sys.argv,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "safetensors": _version("safetensors"),
            "transformers": _version("transformers"),
            "transformer_lens": _version("transformer-lens"),
            "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "store": {"model": MODEL, "hook": HOOK, "dataset": DATASET, "rows": STORE_ROWS,
                      "context_length": CONTEXT, "dtype": STORE_DTYPE},
            "saes": {"archs": archs, "n_latents": N_LATENTS, "k": K, "batch_size": BATCH,
                     "steps": SAE_STEPS, "seed": SEED, "x_rows": X_ROWS},
            "resume": resume,
        }
        (stage / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(stage, out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KiB)", file=sys.stderr)
    # The store readers' prefetch threads are daemons that stop soon after their reader is
    # closed; one still inside torch at interpreter exit can abort the process ("terminate
    # called without an active exception", seen once), so let them finish first.
    for t in threading.enumerate():
        if t.name.startswith(("store-prefetch", "store-loader")):
            t.join(timeout=10)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
