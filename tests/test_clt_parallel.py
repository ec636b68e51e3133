"""Cross-layer transcoder training at parity with the SAE trainer: bf16 autocast, and data
parallel under torchrun (2 gloo ranks train the one-process run of the same global batch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_sae.train.clt import CLTTrainConfig, train_clt

PAIRS = [(f"blocks.{i}.ln2.hook_normalized", f"blocks.{i}.hook_mlp_out") for i in (0, 1)]
B, STEPS = 64, 12
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spec(tmp_path_factory, tiny_gpt2_dir, text_dir) -> str:
    from llm_sae.harvest.config import HarvestConfig
    from llm_sae.harvest.run import harvest

    dirs = harvest(HarvestConfig(
        model=str(tiny_gpt2_dir), hook=[o for _, o in PAIRS], pair=[f"{i}:{o}" for i, o in PAIRS],
        dataset=str(text_dir / "docs.jsonl"), tokens=1024, out=str(tmp_path_factory.mktemp("clt_par") / "st"),
        context_length=32, batch_size=16, device="cpu", shard_rows=512, progress=False,
    ))
    return ",".join(f"{dirs[i]}:{dirs[o]}" for i, o in PAIRS)


def cfg_for(spec: str, out: Path, **kw) -> CLTTrainConfig:
    base = dict(pair=[spec], out=str(out), n_latents=48, k=4, batch_size=B, tokens=B * STEPS, lr=3e-3,
                checkpoint_every=0, log_every=4, device="cpu", progress=False)
    return CLTTrainConfig(**{**base, **kw})


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "clt.safetensors"))


def _train_job(cfg: CLTTrainConfig) -> None:
    train_clt(cfg)


@pytest.fixture(scope="module")
def two_ranks(spec, tmp_path_factory) -> Path:
    """One-rank references, then every 2-rank run in one session (starting processes costs
    more than these runs): data parallel, latent-sharded, and sharded resuming a one-rank
    checkpoint."""
    from test_distributed import spawn

    root = tmp_path_factory.mktemp("clt_ranks")
    torch.set_num_threads(1)
    train_clt(cfg_for(spec, root / "one"))
    train_clt(cfg_for(spec, root / "resumed", tokens=B * STEPS // 2))  # its checkpoint: step 6 of 12
    spawn([(_train_job, cfg_for(spec, root / "dp")),
           (_train_job, cfg_for(spec, root / "sharded", shard_latents=2)),
           (_train_job, cfg_for(spec, root / "resumed", shard_latents=2))])
    return root


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:  # the same global batch: only the all-reduces' rounding differs
        torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=1e-3, msg=f"{k} differs")


def test_two_ranks_train_the_one_rank_run(two_ranks, spec, tmp_path):
    one = weights(two_ranks / "one")
    assert_same(one, weights(two_ranks / "dp"))
    lines = (two_ranks / "dp" / "metrics.jsonl").read_text().splitlines()  # rank 0 alone logs
    assert len(lines) == STEPS // 4
    # The comparison can fail: half the global batch (what one rank sees) gives other weights.
    train_clt(cfg_for(spec, tmp_path / "half", batch_size=B // 2, tokens=B // 2 * STEPS))
    half = weights(tmp_path / "half")
    assert any(not torch.allclose(half[k], one[k], atol=2e-4, rtol=1e-3) for k in one if k.startswith("W_"))


def test_sharded_latents_train_the_one_rank_run(two_ranks):
    """Each rank holds half of every layer's latents; the saved CLT is whole and equal to
    the one-rank run's, also when resumed sharded from a one-rank checkpoint."""
    import json

    one = weights(two_ranks / "one")
    assert_same(one, weights(two_ranks / "sharded"))
    assert_same(one, weights(two_ranks / "resumed"))
    s = json.loads((two_ranks / "resumed" / "train_summary.json").read_text())
    assert (s["resumed_at"], s["data_parallel_ranks"], s["latent_shards"]) == (STEPS // 2, 1, 2)
    assert s["memory_bytes_per_layer"][0] == 16 * 24 * (32 + 1 + 2 * 32)  # 24 of the 48 latents


def test_bf16_autocast_keeps_float32_weights_and_trains(spec, tmp_path):
    import json

    from llm_sae.config import ConfigError

    runs = {}
    for precision in ("fp32", "bf16"):
        train_clt(cfg_for(spec, tmp_path / precision, precision=precision, tokens=B * 60, log_every=60))
        s = json.loads((tmp_path / precision / "train_summary.json").read_text())
        assert s["precision"] == precision
        runs[precision] = s["final"]
        assert all(v.dtype == torch.float32 for v in weights(tmp_path / precision).values())
    assert weights(tmp_path / "bf16")["W_enc"].ne(weights(tmp_path / "fp32")["W_enc"]).any()  # autocast ran
    for layer in (0, 1):  # and cost little: the FVU of each output within 0.05 of float32's
        assert runs["bf16"][f"fvu_{layer}"] < runs["fp32"][f"fvu_{layer}"] + 0.05, runs
    with pytest.raises(ConfigError, match="precision must be one of"):
        train_clt(cfg_for(spec, tmp_path / "bad", precision="fp16"))
