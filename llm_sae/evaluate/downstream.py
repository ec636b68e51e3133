"""Next-token loss with the SAE spliced into the model, and loss recovered."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llm_sae.errors import DataError
from llm_sae.evaluate.config import EvalConfig, EvalError
from llm_sae.evaluate.stats import reconstruct


def _hook_fn(replace: Any, keep_BL: Tensor | None) -> Any:
    def fn(x: Tensor, hook: Any) -> Tensor:
        shape = x.shape
        x_hat = replace(x.reshape(-1, shape[-1]).float()).reshape(shape).to(x.dtype)
        if keep_BL is not None:
            x_hat = torch.where(keep_BL[..., None], x, x_hat)
        return x_hat

    return fn


class _LossAcc:
    def __init__(self) -> None:
        self.ce = self.kl = 0.0
        self.n = 0

    def add(self, logp_clean: Tensor, logits: Tensor, targets: Tensor, mask: Tensor) -> None:
        logp = logits[:, :-1].float().log_softmax(-1)
        ce = -logp.gather(-1, targets[..., None]).squeeze(-1)
        kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
        self.ce += float(ce[mask].double().sum())
        self.kl += float(kl[mask].double().sum())
        self.n += int(mask.sum())

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"ce": self.ce / n, "kl": self.kl / n}


@torch.no_grad()
def downstream_metrics(
    model: Any,
    hook: str,
    saes: dict[str, Any],
    contexts_CL: Tensor,
    *,
    mean_D: Tensor,
    special_ids: list[int] = (),  # type: ignore[assignment]
    exclude_special: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Next-token CE and KL to the clean model with each SAE spliced in at ``hook``.

    The hook replaces the activation at every position (but special tokens when
    ``exclude_special``, which also leaves those positions out of the averages) with the
    SAE's reconstruction, zeros, or ``mean_D``. Returns clean/zero/mean numbers and, per
    SAE, ce, kl, ce_delta and loss recovered against both ablations.
    """
    from tqdm.auto import tqdm

    device = next(iter(model.parameters())).device
    mean_D = mean_D.float().to(device)
    replacers: dict[str, Any] = {
        "zero_ablation": lambda x: torch.zeros_like(x),
        "mean_ablation": lambda x: mean_D.expand_as(x),
    }
    for name, sae in saes.items():
        replacers[name] = lambda x, sae=sae: reconstruct(sae, x)[1]
    acc = {"clean": _LossAcc(), **{k: _LossAcc() for k in replacers}}
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long, device=device)
    bar = tqdm(total=len(contexts_CL), disable=not progress, desc="downstream", unit="ctx", file=sys.stderr)
    for s in range(0, len(contexts_CL), batch_size):
        toks_BL = contexts_CL[s : s + batch_size].to(device)
        keep_BL = torch.isin(toks_BL, special) if exclude_special and special.numel() else None
        mask = torch.ones_like(toks_BL[:, :-1], dtype=torch.bool) if keep_BL is None else ~keep_BL[:, :-1]
        targets = toks_BL[:, 1:]
        clean = model(toks_BL, return_type="logits")
        logp_clean = clean[:, :-1].float().log_softmax(-1)
        acc["clean"].add(logp_clean, clean, targets, mask)
        for name, rep in replacers.items():
            logits = model.run_with_hooks(toks_BL, fwd_hooks=[(hook, _hook_fn(rep, keep_BL))], return_type="logits")
            acc[name].add(logp_clean, logits, targets, mask)
        bar.update(len(toks_BL))
    bar.close()
    res = {k: a.result() for k, a in acc.items()}
    ce_clean = res["clean"]["ce"]
    out: dict[str, Any] = {
        "tokens": acc["clean"].n,
        "ce_clean": ce_clean,
        "ce_zero_ablation": res["zero_ablation"]["ce"],
        "ce_mean_ablation": res["mean_ablation"]["ce"],
        "kl_zero_ablation": res["zero_ablation"]["kl"],
        "kl_mean_ablation": res["mean_ablation"]["kl"],
        "saes": {},
    }
    for name in saes:
        ce = res[name]["ce"]
        out["saes"][name] = {
            "ce": ce,
            "ce_delta": ce - ce_clean,
            "kl": res[name]["kl"],
            "loss_recovered_zero": _recovered(out["ce_zero_ablation"], ce, ce_clean),
            "loss_recovered_mean": _recovered(out["ce_mean_ablation"], ce, ce_clean),
        }
    return out


def _recovered(ce_ablate: float, ce: float, ce_clean: float) -> float:
    den = ce_ablate - ce_clean
    return (ce_ablate - ce) / den if abs(den) > 1e-12 else float("nan")


def eval_contexts(
    store: Any, tokenizer: Any, cfg: EvalConfig, n_ctx: int | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Token contexts for the downstream metrics, and a note of where the text came from.

    With no --dataset, the store's dataset is read from just after the text the store was
    harvested from (its progress), so the contexts are ones the SAE never saw; when that
    text has run out, from the start of the dataset (noted in the report).
    """
    from llm_sae.lm.text import StreamPos, chat_renderer, iter_documents, pack_contexts

    spec = store.manifest.get("dataset") or {}
    L = cfg.context_length or store.context_length or 128
    if n_ctx:
        L = min(L, n_ctx)
    if cfg.dataset is not None:
        name, config = cfg.dataset, cfg.dataset_config
        start, source = StreamPos(), "--dataset"
    else:
        name, config = spec.get("name"), spec.get("config")
        if not name or str(name).startswith("<python"):
            raise EvalError(
                f"the store at {store.path} does not name a readable dataset ({name!r}); pass "
                "--dataset with text for the downstream metrics, or --no-downstream"
            )
        prog = store.manifest.get("progress") or {}
        start = StreamPos(int(prog.get("doc", 0)), int(prog.get("offset", 0))) if "doc" in prog else StreamPos()
        source = "store dataset, after the harvested text"
    split = cfg.split or spec.get("split") or "train"
    column = cfg.text_column or spec.get("text_column") or "text"

    # A store harvested with --chat-template holds conversations: render them the same way.
    chat = cfg.dataset is None and (store.manifest.get("harvest") or {}).get("chat_template")
    render = chat_renderer(tokenizer) if chat else None

    def take(start: StreamPos) -> list[np.ndarray]:
        docs = iter_documents(name, config=config, split=split, text_column=column, render=render)
        out = []
        for toks, _ in pack_contexts(docs, tokenizer, L, start=start):
            out.append(toks)
            if len(out) >= cfg.n_contexts:
                break
        return out

    ctx = take(start)
    if len(ctx) < cfg.n_contexts and start != StreamPos():
        warnings.warn(
            f"only {len(ctx)} unseen contexts after the harvested text of {name!r}; using the "
            "dataset from its start (text the SAE may have been trained on)", stacklevel=2,
        )
        ctx, source = take(StreamPos()), "store dataset from its start (overlaps the harvested text)"
    if not ctx:
        raise DataError(f"dataset {name!r} gives no context of {L} tokens; give more text or a smaller --context-length")
    info = {"dataset": str(name), "split": split, "source": source, "contexts": len(ctx), "context_length": L}
    return torch.from_numpy(np.stack(ctx)), info
