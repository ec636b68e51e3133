"""The harvest's background store writer: order kept, output identical to the synchronous
path, bounded in-flight batches, writer-thread errors re-raised, and resume unaffected.

The pinned-buffer copies need CUDA; the ring and the thread are device-agnostic and are
tested here on CPU."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from llm_sae.harvest.config import HarvestConfig
from llm_sae.harvest.loop import LAST_RUN, Job, StoreSink
from llm_sae.harvest.run import harvest
from llm_sae.store.writer import StoreWriter


class FakeWriter:
    """Records appends; optionally slow, optionally failing at a given append."""

    def __init__(self, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.got: list[tuple[int, torch.Tensor]] = []
        self.delay, self.fail_at = delay, fail_at
        self.torch_dtype = torch.float32
        self.in_flight_max = 0

    def append(self, x_ND, tok_N, pos_N2, *, progress, sequences) -> None:
        if self.fail_at is not None and len(self.got) == self.fail_at:
            raise OSError("disk full (simulated)")
        time.sleep(self.delay)
        self.got.append((progress["i"], x_ND.clone()))


def _job(i: int, hooks=("h",)) -> Job:
    x = torch.full((3, 4), float(i))
    return Job({h: x for h in hooks}, None, None, {"i": i}, None, (i, i + 1))


@pytest.mark.parametrize("threaded", [True, False])
def test_order_is_kept(threaded):
    writers = {"a": FakeWriter(delay=0.002), "b": FakeWriter()}
    sink = StoreSink(writers, threaded=threaded)
    for i in range(20):
        sink.put(_job(i, hooks=("a", "b")))
    sink.close()
    for w in writers.values():
        assert [i for i, _ in w.got] == list(range(20))
        assert all(torch.equal(x, torch.full((3, 4), float(i))) for i, x in w.got)


def test_in_flight_batches_are_bounded_by_the_ring():
    w = FakeWriter(delay=0.02)
    sink = StoreSink({"h": w}, depth=2)
    t0 = time.perf_counter()
    for i in range(6):
        sink.put(_job(i))
        # The loop runs ahead of the writer by at most the ring's depth.
        assert i + 1 - len(w.got) <= 2 + 1
    assert time.perf_counter() - t0 >= 0.02 * 3  # put waited for free slots
    sink.close()
    assert len(w.got) == 6


def test_writer_error_is_raised_in_the_loop_and_later_batches_are_not_written():
    w = FakeWriter(delay=0.001, fail_at=3)
    sink = StoreSink({"h": w}, depth=2)
    with pytest.raises(OSError, match="disk full"):
        for i in range(50):
            sink.put(_job(i))
        sink.close()
    sink.close(drain=False)
    assert [i for i, _ in w.got] == [0, 1, 2]
    assert sink._thread is None


def test_close_without_drain_drops_queued_batches_quietly():
    w = FakeWriter(delay=0.2)  # slow enough that the queue cannot empty before close
    sink = StoreSink({"h": w}, depth=4)
    for i in range(4):
        sink.put(_job(i))
    sink.close(drain=False)
    assert len(w.got) < 4
    assert sink._thread is None


# --- through the real harvest --------------------------------------------------------


def _cfg(model_dir, text_dir, out, **kw) -> HarvestConfig:
    base = dict(
        model=str(model_dir),
        hook=["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"],
        dataset=str(text_dir / "docs.jsonl"),
        tokens=500,
        out=str(out),
        context_length=32,
        batch_size=4,
        device="cpu",
        shard_rows=100,
        dtype="float16",
        progress=False,
    )
    base.update(kw)
    return HarvestConfig(**base)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_async_harvest_is_byte_identical_to_sync(tiny_gpt2_dir, text_dir, tmp_path):
    harvest(_cfg(tiny_gpt2_dir, text_dir, tmp_path / "sync", async_write=False))
    harvest(_cfg(tiny_gpt2_dir, text_dir, tmp_path / "async", async_write=True))
    a, b = _snapshot(tmp_path / "sync"), _snapshot(tmp_path / "async")
    assert len(a) > 4 and a == b
    assert LAST_RUN["write_seconds"] > 0


def test_writer_thread_failure_then_rerun_resumes_exactly(
    tiny_gpt2_dir, text_dir, tmp_path, monkeypatch
):
    harvest(_cfg(tiny_gpt2_dir, text_dir, tmp_path / "ref"))
    real = StoreWriter.append
    calls = {"n": 0}

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 9:  # mid-run, on the writer thread
            assert threading.current_thread().name == "harvest-writer"
            raise OSError("disk full (simulated)")
        return real(self, *a, **kw)

    monkeypatch.setattr(StoreWriter, "append", flaky)
    with pytest.raises(OSError, match="disk full"):
        harvest(_cfg(tiny_gpt2_dir, text_dir, tmp_path / "out"))
    monkeypatch.setattr(StoreWriter, "append", real)
    harvest(_cfg(tiny_gpt2_dir, text_dir, tmp_path / "out"))  # the same command again
    assert _snapshot(tmp_path / "out") == _snapshot(tmp_path / "ref")


class _FakeEvent:
    def __init__(self) -> None:
        self.recorded = self.waited = False

    def record(self) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        assert self.recorded
        self.waited = True


def test_copy_path_reuses_its_ring_buffers_and_waits_on_the_event(monkeypatch):
    """The CUDA path's logic, with ordinary memory standing in for pinned memory."""
    allocated, events = [], []

    def host_buffer(shape, dtype):
        allocated.append((tuple(shape), dtype))
        return torch.empty(shape, dtype=dtype)

    def event():
        events.append(_FakeEvent())
        return events[-1]

    monkeypatch.setattr(StoreSink, "_host_buffer", staticmethod(host_buffer))
    monkeypatch.setattr(StoreSink, "_event", staticmethod(event))
    w = FakeWriter(delay=0.001)
    w.torch_dtype = torch.float16  # rows are cast to the store dtype before the copy
    sink = StoreSink({"h": w}, depth=2, threaded=True)
    sink.pinned = True
    sizes = [5, 3, 5, 8, 2, 8, 1]
    for i, n in enumerate(sizes):
        sink.put(Job({"h": torch.full((n, 4), i + 0.5)}, None, None, {"i": i}, None, (i, i + 1)))
    sink.close()
    assert [i for i, _ in w.got] == list(range(len(sizes)))
    for (i, x), n in zip(w.got, sizes, strict=True):
        assert x.dtype == torch.float16 and x.shape == (n, 4) and bool((x == i + 0.5).all())
    assert all(e.waited for e in events) and len(events) == len(sizes)
    # Two slots, grown only when a batch is larger than what the slot holds.
    assert len(allocated) < len(sizes) and all(d == torch.float16 for _, d in allocated)
