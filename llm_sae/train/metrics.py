"""Training metrics: averages over a window of steps, and where they go (bar, JSONL, wandb)."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from llm_sae.config import to_dict


class MetricWindow:
    """Sums of each step's detached metrics and firing counts since the last ``take``.

    Nothing is read back to the host until ``take``: a GPU step never waits for logging.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.tokens = 0
        self.fired_N: Tensor | None = None
        self.t0 = time.perf_counter()

    def add(self, metrics: dict[str, Tensor], fired_N: Tensor, n_tokens: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.steps += 1
        self.tokens += n_tokens
        self.fired_N = fired_N if self.fired_N is None else self.fired_N + fired_N

    def means(self) -> dict[str, Tensor]:
        """Per-step means and, from the firing counts, the fraction of dense latents
        (firing on more than 10% of tokens)."""
        steps = max(1, self.steps)
        m_t = {k: v / steps for k, v in self.sums.items()}
        if self.fired_N is not None and self.tokens:
            m_t["dense_frac"] = (self.fired_N / self.tokens > 0.1).float().mean()
        return m_t

    def tokens_per_s(self) -> float:
        return self.tokens / max(1e-9, time.perf_counter() - self.t0)


class MetricSink(Protocol):
    """Where a window's metrics go; ``close`` once at the end of the run."""

    def write(self, m: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON line per window, appended (a resumed run continues the file)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "a")  # noqa: SIM115

    def write(self, m: dict[str, float]) -> None:
        self.f.write(json.dumps(m) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class BarSink:
    """The progress bar's postfix: the numbers a person watches."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def write(self, m: dict[str, float]) -> None:
        self.bar.set_postfix(
            fvu=f"{m['fvu']:.4f}", l0=f"{m['l0']:.1f}", dead=f"{m['dead_frac']:.3f}",
            tok_s=f"{m['tokens_per_s']:.3g}",
        )

    def close(self) -> None:
        self.bar.close()


class WandbSink:
    """One wandb run per output folder (a sweep: one per SAE, grouped); a resumed run
    continues the same wandb run."""

    def __init__(self, out_dir: Path, project: str, cfg: Any) -> None:
        import wandb

        id_file = out_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
        id_file.write_text(run_id)
        # An SAE of a sweep (its folder sits beside sweep.json) joins the sweep's group;
        # create_new lets a sweep's runs be open together in one process.
        group = out_dir.parent.name if (out_dir.parent / "sweep.json").exists() else None
        self.run = wandb.init(
            project=project, id=run_id, resume="allow", dir=str(out_dir), name=out_dir.name,
            config=to_dict(cfg), group=group, reinit="create_new",
        )

    def write(self, m: dict[str, float]) -> None:
        self.run.log(m, step=int(m["step"]))

    def close(self) -> None:
        self.run.finish()
