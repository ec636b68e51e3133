"""The replacement model: chosen MLPs replaced by their transcoders, and its next-token loss.

What circuit tracing runs on. Each transcoder reads its input hook (e.g.
``blocks.L.ln2.hook_normalized``) and its prediction replaces its output hook
(``blocks.L.hook_mlp_out``) in the same forward pass, so later layers see earlier
replacements. With ``error=True`` each replacement adds the error term of the clean run,
``y_clean − tc(x_clean)`` (frozen, as circuit-tracer's local replacement model does): all
layers replaced, the model is then the clean model again, which makes the error-free
numbers the ones that measure the transcoders. Loss recovered is against zero-ablating
the same MLP outputs: (CE_zero − CE_replaced) / (CE_zero − CE_clean).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from llm_sae.evaluate.config import EvalError
from llm_sae.evaluate.downstream import eval_contexts


class Splice(Protocol):
    """What replaces one MLP: the hooks it reads (all before ``out_hook`` in the forward
    pass) and its prediction of ``out_hook`` from what the pass held there."""

    out_hook: str

    @property
    def in_hooks(self) -> tuple[str, ...]: ...

    def predict(self, seen: dict[str, Tensor], memo: dict[Any, Tensor]) -> Tensor:
        """``seen``: each in-hook's activations [B, T, D] in this pass; ``memo``: a dict
        for this pass only, where splices that share work (a CLT's codes) keep it."""
        ...


@dataclass
class Replacement:
    """One transcoder and where it sits: it reads ``in_hook`` and replaces ``out_hook``."""

    sae: Any
    in_hook: str
    out_hook: str

    @property
    def in_hooks(self) -> tuple[str, ...]:
        return (self.in_hook,)

    def predict(self, seen: dict[str, Tensor], memo: dict[Any, Tensor]) -> Tensor:
        return _predict(self.sae, seen[self.in_hook])


@dataclass
class CLTLayer:
    """A cross-layer transcoder's output at ``layer``: the sum of the decoders from the
    encoders of layers 0..layer, each encoding its own input hook (``in_hooks[l]``) as the
    pass reaches it, so that with all layers spliced each encoder reads the replaced
    stream. Layers of one CLT share their codes within a pass (``memo``)."""

    clt: Any
    layer: int
    all_in_hooks: tuple[str, ...]
    out_hook: str

    @property
    def in_hooks(self) -> tuple[str, ...]:
        return self.all_in_hooks[: self.layer + 1]

    def predict(self, seen: dict[str, Tensor], memo: dict[Any, Tensor]) -> Tensor:
        zs = []
        for l, hook in enumerate(self.in_hooks):
            key = (id(self.clt), l)
            if key not in memo:
                memo[key] = self.clt.encode_layer(l, seen[hook].reshape(-1, seen[hook].shape[-1]).float())
            zs.append(memo[key])
        y_NE = self.clt.decode_layer(self.layer, zs)
        return y_NE.reshape(*seen[self.in_hooks[-1]].shape[:-1], y_NE.shape[-1])


def replacement_from_run(run_dir: str | Path, sae: Any) -> Replacement:
    """The hooks a transcoder trained by ``llm-sae train --target-store`` reads and writes,
    from its train_cfg.json and the two stores' manifests."""
    cfg_file = Path(run_dir) / "train_cfg.json"
    try:
        cfg = json.loads(cfg_file.read_text())
        hooks = [json.loads((Path(cfg[k]) / "manifest.json").read_text())["hook"] for k in ("store", "target_store")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvalError(
            f"cannot tell which hooks {run_dir} reads and writes ({e}); it needs its train_cfg.json "
            "and both stores (a transcoder trained with --target-store), or build a Replacement by hand"
        ) from None
    return Replacement(sae, hooks[0], hooks[1])


def _loss(logits_BLV: Tensor, logp_clean_BLV: Tensor | None, targets_BL: Tensor) -> tuple[float, float, int]:
    logp = logits_BLV[:, :-1].float().log_softmax(-1)
    ce = float(-logp.gather(-1, targets_BL[..., None]).sum())
    kl = 0.0 if logp_clean_BLV is None else float((logp_clean_BLV.exp() * (logp_clean_BLV - logp)).sum())
    return ce, kl, targets_BL.numel()


@torch.no_grad()
def replacement_metrics(
    model: Any, reps: dict[str, Splice], contexts_CL: Tensor, *, batch_size: int = 8,
) -> dict[str, Any]:
    """CE, KL to the clean model and loss recovered for each transcoder (or CLT layer)
    alone and for all at once (key ``all``), each without and with the error term."""
    if not reps:
        raise EvalError("no transcoders to splice in; give at least one")
    outs = [r.out_hook for r in reps.values()]
    if len(set(outs)) != len(outs):
        raise EvalError(f"two transcoders replace the same hook among {outs}; give one per MLP")
    groups = {name: [name] for name in reps}
    if len(reps) > 1:
        groups["all"] = list(reps)
    sums: dict[str, list[float]] = {}

    def add(key: str, ce: float, kl: float, n: int) -> None:
        s = sums.setdefault(key, [0.0, 0.0, 0])
        s[0] += ce
        s[1] += kl
        s[2] += n

    for s in range(0, len(contexts_CL), batch_size):
        toks_BL = contexts_CL[s : s + batch_size].to(next(iter(model.parameters())).device)
        targets_BL = toks_BL[:, 1:]
        clean: dict[str, Tensor] = {}
        hooks = sorted({h for r in reps.values() for h in (*r.in_hooks, r.out_hook)})
        logits = model.run_with_hooks(
            toks_BL, fwd_hooks=[(h, _recorder(clean, h)) for h in hooks], return_type="logits"
        )
        logp_clean = logits[:, :-1].float().log_softmax(-1)
        add("clean", *_loss(logits, None, targets_BL))
        memo: dict[Any, Tensor] = {}
        err = {n: clean[r.out_hook] - r.predict(clean, memo) for n, r in reps.items()}
        for gname, members in groups.items():
            zero = [(reps[n].out_hook, lambda x, hook: torch.zeros_like(x)) for n in members]
            add(f"{gname}/zero", *_loss(model.run_with_hooks(toks_BL, fwd_hooks=zero, return_type="logits"),
                                        logp_clean, targets_BL))
            for with_err in (False, True):
                fwd = _splice([(reps[n], err[n] if with_err else None) for n in members])
                logits = model.run_with_hooks(toks_BL, fwd_hooks=fwd, return_type="logits")
                add(f"{gname}/{'error' if with_err else 'replaced'}", *_loss(logits, logp_clean, targets_BL))
    mean = {k: (v[0] / max(v[2], 1), v[1] / max(v[2], 1)) for k, v in sums.items()}
    ce_clean = mean["clean"][0]
    out: dict[str, Any] = {"ce_clean": ce_clean, "tokens": int(sums["clean"][2]), "replaced": {}}
    for gname, members in groups.items():
        ce_zero, kl_zero = mean[f"{gname}/zero"]
        row: dict[str, Any] = {"transcoders": members, "ce_zero_ablation": ce_zero, "kl_zero_ablation": kl_zero}
        for tag in ("replaced", "error"):
            ce, kl = mean[f"{gname}/{tag}"]
            den = ce_zero - ce_clean
            rec = (ce_zero - ce) / den if abs(den) > 1e-12 else float("nan")
            suffix = "" if tag == "replaced" else "_with_error"
            row.update({f"ce{suffix}": ce, f"kl{suffix}": kl, f"loss_recovered{suffix}": rec})
        out["replaced"][gname] = row
    return out


def format_replacement(rep: dict[str, Any]) -> list[str]:
    """Table lines for ``replacement_metrics``'s result: one row per layer and one for all."""
    head = ["replaced", "CE", "KL", "LR", "CE+err", "KL+err", "LR+err", "CE zero-abl."]
    rows = [head]
    for name, r in rep["replaced"].items():
        rows.append([name] + [f"{r[k]:.4f}" for k in (
            "ce", "kl", "loss_recovered", "ce_with_error", "kl_with_error", "loss_recovered_with_error",
            "ce_zero_ablation")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"replacement model over {rep['tokens']} tokens: clean CE {rep['ce_clean']:.4f}"]
    for j, r in enumerate(rows):
        lines.append("  ".join(format(v, ("<" if i == 0 else ">") + str(w)) for i, (v, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("LR = loss recovered against zero-ablating the same MLP outputs; +err = with the "
                 "clean run's error term (1.0 when exact)")
    return lines


def _recorder(into: dict[str, Tensor], name: str) -> Any:
    def fn(x: Tensor, hook: Any) -> Tensor:
        into[name] = x.detach()
        return x

    return fn


def _predict(sae: Any, x_BLD: Tensor) -> Tensor:
    shape = x_BLD.shape
    y_NE = sae.predict(x_BLD.reshape(-1, shape[-1]).float())
    return y_NE.reshape(*shape[:-1], y_NE.shape[-1])


def _splice(pairs: list[tuple[Splice, Tensor | None]]) -> list[tuple[str, Any]]:
    """Hooks for one pass that record each input and replace each output with the
    prediction (+ error)."""
    seen: dict[str, Tensor] = {}
    memo: dict[Any, Tensor] = {}
    fwd: list[tuple[str, Any]] = [(h, _recorder(seen, h)) for h in dict.fromkeys(
        h for rep, _ in pairs for h in rep.in_hooks)]
    for rep, err in pairs:
        def put(y: Tensor, hook: Any, rep: Splice = rep, err: Tensor | None = err) -> Tensor:
            y_hat = rep.predict(seen, memo)
            return (y_hat if err is None else y_hat + err).to(y.dtype)

        fwd.append((rep.out_hook, put))
    return fwd


def add_replacement(report: dict[str, Any], model: Any, reps: dict[str, Splice], store: Any, cfg: Any) -> None:
    """The replacement model on ``cfg``'s evaluation contexts (the text after ``store``'s):
    ``report["replacement"]`` and each replaced run's ``report["saes"][name]["replacement"]``."""
    contexts_CL, info = eval_contexts(store, model.tokenizer, cfg, getattr(model.cfg, "n_ctx", None))
    rep = replacement_metrics(model, reps, contexts_CL, batch_size=cfg.model_batch_size)
    report["replacement"] = {**rep, "text": info}
    for name in reps:
        report["saes"][name]["replacement"] = rep["replaced"][name]
