"""Adam that can also take a parameter's gradient a slab of rows at a time.

The sparse kernels never build a whole [N, D] weight gradient in one process: they hand
the trainer its sparse factors, and the trainer writes the gradient a few MB of rows at a
time (``llm_sae.kernels.sparse_ops.DeferredWeightGrads``). ``SlicedAdam`` applies Adam to
such a parameter slab by slab, with exactly the arithmetic of ``torch.optim.Adam`` (it is a
subclass: same defaults, same state layout, so its ``state_dict`` is Adam's and old
checkpoints load). Its updates go through torch's public functional ``torch.optim.adam.adam``.

``step(found_inf=...)`` skips the update on the device when a loss was not finite, so a GPU
step never waits for the host to read the loss back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as adam_update


class SlicedAdam(torch.optim.Adam):
    """``torch.optim.Adam`` plus ``step_rows``: the update of one parameter from its gradient
    given in row slabs. Complex parameters and ``differentiable`` are not supported."""

    @torch.no_grad()
    def step(self, closure: Any = None, *, found_inf: Tensor | None = None) -> Any:  # type: ignore[override]
        """Adam on every parameter that has a ``.grad``; a parameter whose gradient comes
        in slabs has none and is updated by ``step_rows``. ``found_inf``: a one-element
        float tensor, nonzero to skip the update (fused Adam only, checked on the device)."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state_of(p, group) for p in params]
            self._apply(group, params, [p.grad for p in params], states, [s["step"] for s in states], found_inf)
        return None

    @torch.no_grad()
    def step_rows(
        self, p: Tensor, slabs: Iterable[tuple[int, Tensor]], *, found_inf: Tensor | None = None
    ) -> None:
        """Adam on ``p`` from its gradient given as ``(first_row, g_RD)`` slabs covering
        every row once. Each slab is Adam on row views of ``p`` and its moments (one tensor
        at a time, never foreach); the step count advances once for the whole parameter,
        as one ``step`` would."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        state = self._state_of(p, group)
        P = p.detach()
        for start, g_RD in slabs:
            rows = slice(start, start + g_RD.shape[0])
            view = {k: state[k][rows] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in state}
            # Each slab's call counts the step once on a copy; the state advances below.
            self._apply(group, [P[rows]], [g_RD], [view], [state["step"].clone()], found_inf, foreach=False)
        state["step"] += 1

    def _state_of(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """``p``'s Adam state, created lazily exactly as ``torch.optim.Adam`` creates it."""
        state = self.state[p]
        if not state:
            if group["fused"] or group["capturable"]:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            else:  # torch keeps it on the CPU, in float64 if that is the default dtype
                wide = torch.get_default_dtype() == torch.float64
                state["step"] = torch.tensor(0.0, dtype=torch.float64 if wide else torch.float32)
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _apply(
        group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
        steps: list[Tensor], found_inf: Tensor | None, foreach: bool | None = None,
    ) -> None:
        beta1, beta2 = group["betas"]
        adam_update(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], steps,
            foreach=group["foreach"] if foreach is None else foreach, fused=group["fused"], capturable=group["capturable"],
            differentiable=False, found_inf=found_inf,
            decoupled_weight_decay=group.get("decoupled_weight_decay", False),
            amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        )
