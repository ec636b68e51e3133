"""Release 0.1 compatibility: what 0.1 wrote, this code reads and continues bit for bit.

tests/data/release_0_1/ was written by the 0.1 release's own code
(scripts/make_release_fixtures.py; commit, versions and command in provenance.json): a
harvested store, a saved SAE of every architecture with its encode/decode outputs on the
store's first rows, and a TopK run's mid-run checkpoint with the weights that run ended
with, uninterrupted. Only imports that every layout of the package keeps are used here.

The store must read back identically everywhere. The SAE outputs and the resumed weights are
float32 matmul results, and a BLAS rounds those differently on different CPUs (MKL's AVX2
and AVX-512 kernels differ in the last bit at these shapes), so they are compared bit for
bit only where ``platform_probe.json`` shows this machine rounds plain torch matmuls on the
fixtures' tensors as the one that wrote them did. Elsewhere they are compared within
rtol=1e-5, atol=1e-6, with a warning that bits were not: MKL limited to AVX2 or SSE4.2 here
moves the outputs and the resumed weights by at most ~5e-7, while a resume that loses the
Adam moments, is one batch off, or forgets which latents are dead moves the weights by
3e-2, 6e-3 and 1e-4. (A 1e-6 relative change, such as a perturbed input scale, is caught
only bit for bit.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llm_sae.sae import load_sae
from llm_sae.store import open_store, verify_store
from llm_sae.train import TrainConfig, find_checkpoint, read_checkpoint_meta, train

FIX = Path(__file__).parent / "data" / "release_0_1"
PROVENANCE = json.loads((FIX / "provenance.json").read_text())
ARCHS = PROVENANCE["saes"]["archs"]


@pytest.fixture
def single_thread():
    """One torch thread, as the fixtures were made: the reduction order of a matmul may
    depend on how it is split over threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sha256(t: torch.Tensor) -> str:
    """As scripts/make_release_fixtures.py computes it: the tensor's bytes in C order."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def exact(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{what}: {actual.dtype} {tuple(actual.shape)} != {expected.dtype} {tuple(expected.shape)}")
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def platform_probe() -> dict[str, str]:
    """scripts/make_release_fixtures.py's ``platform_probe``, line for line: plain torch only."""
    fix = FIX
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


@functools.cache
def same_rounding() -> bool:
    """Whether this machine's matmuls round as the fixtures' machine's did (one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return platform_probe() == json.loads((FIX / "platform_probe.json").read_text())
    finally:
        torch.set_num_threads(n)


def matches(actual: torch.Tensor, expected: torch.Tensor, what: str, *, rtol: float, atol: float) -> None:
    """Bit for bit where the platform rounds as the fixtures' did; else within rtol/atol."""
    if same_rounding():
        exact(actual, expected, what)
        return
    warnings.warn(
        f"this CPU's matmuls round differently from the machine that wrote {FIX.name} "
        f"({PROVENANCE['cpu_capability']}, torch {PROVENANCE['torch']}): compared within "
        f"rtol={rtol}, atol={atol}, not bit for bit", stacklevel=2)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------ the store


def test_store_opens_verifies_and_reads_the_release_values():
    exp = json.loads((FIX / "store_expected.json").read_text())
    ref = load_file(str(FIX / "store_expected.safetensors"))
    assert verify_store(FIX / "store") == []
    s = open_store(FIX / "store")
    n = s.n_rows
    assert (n, s.d_in, str(s.dtype), s.hook, s.model, s.context_length) == (
        exp["n_rows"], exp["d_in"], exp["dtype"], exp["hook"], exp["model"], exp["context_length"])
    assert s.mean_norm == exp["mean_norm"]
    exact(s.mean, ref["mean"], "mean")

    # Every row, token, position and context, and some rows in full (across a shard boundary).
    seq_ids = torch.unique(s.positions(0, n)[:, 0])
    assert seq_ids.numel() == exp["n_sequences"]
    assert {k: sha256(v) for k, v in {
        "acts": s.acts(0, n), "token_ids": s.token_ids(0, n), "positions": s.positions(0, n),
        "sequence_tokens": s.sequence_tokens(seq_ids)}.items()} == exp["sha256"]
    h, b = len(ref["acts_head"]), exp["boundary_row"]
    exact(s.acts(0, h), ref["acts_head"], "acts(0, h)")
    exact(s.acts(b - 8, b + 8), ref["acts_boundary"], "acts across the shard boundary")
    exact(s.token_ids(0, h), ref["token_ids_head"], "token_ids")
    exact(s.positions(0, h), ref["positions_head"], "positions")
    exact(s.sequence_tokens(exp["sequence_ids_head"]), ref["sequence_tokens_head"], "sequence_tokens")

    # The shuffled batch order, which resuming a run depends on: the default order, the
    # training run's (looping into a second epoch), and that order resumed at batch 5.
    def batches(count: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        it = iter(s.reader(kw.pop("batch_size"), with_rows=True, **kw))
        try:
            got = [next(it) for _ in range(count)]
        finally:
            it.close()
        return torch.stack([x for x, _ in got]), torch.stack([r for _, r in got]).to(torch.int32)

    for name, r in exp["readers"].items():
        kw = {k: v for k, v in r.items() if k not in ("batches", "x_sha256", "x_dtype")}
        x, rows = batches(r["batches"], **kw)
        exact(rows, ref[f"reader_{name}_rows"], f"reader {name}: row order")
        assert str(x.dtype) == r["x_dtype"] and sha256(x) == r["x_sha256"], f"reader {name}: values"
    train_kw = {k: v for k, v in exp["readers"]["train"].items() if k not in ("batches", "x_sha256", "x_dtype")}
    count = exp["readers"]["train"]["batches"]
    _, rows = batches(count - 5, start_batch=5, **train_kw)
    exact(rows, ref["reader_train_rows"][5:], "reader train resumed at batch 5: row order")


# ------------------------------------------------------------------------------ the SAEs


@pytest.mark.parametrize("arch", ARCHS)
def test_release_sae_loads_and_reproduces_its_outputs(arch, single_thread):
    ref = load_file(str(FIX / "sae_expected.safetensors"))
    sae = load_sae(FIX / "saes" / arch)
    assert sae.cfg.arch == arch and sae.cfg.d_in == 128
    assert sae.cfg.n_latents == PROVENANCE["saes"]["n_latents"]
    assert not sae.training
    x_BD = ref["x"]
    with torch.no_grad():
        z_BN = sae.encode(x_BD)
        matches(z_BN, ref[f"{arch}.encoded"], f"{arch} encode", rtol=1e-5, atol=1e-6)
        matches(sae.decode(z_BN), ref[f"{arch}.decoded"], f"{arch} decode(encode)", rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ resuming


def test_resuming_a_release_checkpoint_ends_as_the_uninterrupted_run(tmp_path, monkeypatch, single_thread):
    """The checkpoint resumes from its own record of the run's config, in a copy of the
    layout it was written in (store and run directory relative to the working directory)."""
    ckpt = FIX / "resume" / "checkpoint"
    meta = read_checkpoint_meta(ckpt)
    cfg = dict(meta["train"])
    assert meta["step"] == PROVENANCE["resume"]["checkpoint_step"] < cfg["tokens"] // cfg["batch_size"]
    assert not Path(cfg["store"]).is_absolute() and not Path(cfg["out"]).is_absolute()
    shutil.copytree(FIX / "store", tmp_path / cfg["store"])
    shutil.copytree(ckpt, tmp_path / cfg["out"] / "checkpoint")
    monkeypatch.chdir(tmp_path)
    assert find_checkpoint(cfg["out"]) == Path(cfg["out"]) / "checkpoint"
    # Release 0.1 ran AuxK's products in float32; on CPUs with bfloat16 units they now run
    # in bfloat16 (kernels/auxk.py), another run by ~1e-4 of a weight's value.
    monkeypatch.setenv("LLM_SAE_AUXK_BF16", "0")

    cfg["adam_betas"] = tuple(cfg["adam_betas"])
    out = train(TrainConfig(**cfg))

    final = FIX / "resume" / "final"
    assert read_checkpoint_meta(find_checkpoint(out))["step"] == PROVENANCE["resume"]["steps"]
    # The same config: every key release 0.1 wrote, with its value; keys added since (new
    # architectures' parameters, transcoders' d_out/skip) at defaults that change nothing.
    import dataclasses
    import json

    from llm_sae.sae import SAEConfig

    got_cfg, want_cfg = json.loads((out / "cfg.json").read_text()), json.loads((final / "cfg.json").read_text())
    assert {k: got_cfg[k] for k in want_cfg} == want_cfg
    defaults = {f.name: f.default for f in dataclasses.fields(SAEConfig)}
    assert {k: v for k, v in got_cfg.items() if k not in want_cfg} == {
        k: defaults[k] for k in got_cfg if k not in want_cfg}
    # Within rounding, not bit for bit: since release 0.1 AuxK sums over the dead latents
    # only (issue 24), the same arithmetic in another order. The state the checkpoint
    # restores is compared exactly below.
    got, want = load_file(str(out / "sae.safetensors")), load_file(str(final / "sae.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"resumed {n}: {m}")


def test_a_release_checkpoint_restores_every_value_exactly(tmp_path):
    """Weights, Adam's moments and step counts, dead-latent counts, counters and RNG states
    come back from release 0.1's pickled state.pt (read weights-only) bit for bit."""
    import random

    import numpy as np

    from llm_sae.train import Trainer, build_sae
    from llm_sae.train.checkpoint import LEGACY_STATE, load_legacy_state

    ckpt = FIX / "resume" / "checkpoint"
    meta = read_checkpoint_meta(ckpt)
    cfg = dict(meta["train"])
    cfg["adam_betas"] = tuple(cfg["adam_betas"])
    tc = TrainConfig(**cfg)
    trainer = Trainer(build_sae(tc, meta["sae"]["d_in"]), tc, total_steps=tc.tokens // tc.batch_size)
    trainer.load_checkpoint(ckpt)
    want = load_legacy_state((ckpt / LEGACY_STATE).read_bytes())
    for name, t in trainer.sae.state_dict().items():
        exact(t, want["sae"][name], f"restored {name}")
    got_opt = trainer.opt.state_dict()
    for i, st in want["opt"]["state"].items():
        for key, t in st.items():
            exact(got_opt["state"][i][key], t, f"restored Adam {i}.{key}")
    exact(trainer.dead.tokens_since_fired_N, want["tokens_since_fired_N"], "tokens since fired")
    assert trainer.step_idx == want["counters"]["step_idx"] == meta["step"]
    assert trainer.input_scale == want["counters"]["input_scale"]
    exact(torch.get_rng_state(), want["rng"]["torch"], "torch RNG")
    assert random.getstate() == want["rng"]["python"]
    assert np.array_equal(np.random.get_state()[1], want["rng"]["numpy"][1])
