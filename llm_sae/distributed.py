"""Training on many devices under ``torchrun``: data parallel, latent-sharded TopK, or both.

``Parallel`` is the single-process default whose hooks do nothing; the trainer calls the
same hooks whatever the mode, so it never branches on it. ``Distributed`` fills them in
on a 2-D device mesh (``dp`` × ``shard``): gradients are averaged over ``dp``, fired
counts summed (dead-latent statistics agree), running statistics averaged, and with
``shard`` > 1 each rank owns n/shard latents of a ``ShardedTopKSAE``. Checkpoints hold the
full, unsharded state, so a run resumes with any number of ranks.

Every rank draws the same global batch order (a one-rank store reader) and keeps its
slice, so the global batch of step t is the same whatever the world size.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llm_sae.config import ConfigError
from llm_sae.errors import LlmSaeError
from llm_sae.sae import SAE, ForwardOutput, TopKSAE

# ------------------------------------------------------------------------- set-up


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env() -> tuple[int, int]:
    """(rank, world_size), initialising torch.distributed under torchrun if needed.

    NCCL when CUDA is available, gloo otherwise. ``LLM_SAE_DIST_TIMEOUT`` (seconds,
    default 600) bounds how long a rank waits in a collective for a peer that died.
    """
    if env_world_size() > 1 and dist.is_available():
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":  # one GPU per rank; NCCL collectives run on the current one
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            timeout = datetime.timedelta(
                seconds=float(os.environ.get("LLM_SAE_DIST_TIMEOUT", "600"))
            )
            dist.init_process_group(backend, timeout=timeout)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class CommStats:
    """Bytes each rank contributes to collectives (payload, not the wire protocol)."""

    bytes: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.bytes = self.calls = 0


COMM = CommStats()


def _count(t: Tensor) -> None:
    COMM.bytes += t.numel() * t.element_size()
    COMM.calls += 1


def _group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_(t: Tensor, group: Any, op: Any = None) -> Tensor:
    """In-place all-reduce (sum unless ``op``) over ``group``; no-op for a group of one."""
    if _group_size(group) > 1:
        _count(t)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def all_gather_cat(t: Tensor, group: Any, dim: int = 0) -> Tensor:
    """Concatenation along ``dim`` of every rank's ``t`` (equal shapes), in rank order."""
    n = _group_size(group)
    if n == 1:
        return t
    _count(t)
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def gather_rows_to_cpu(t: Tensor, group: Any, chunk_bytes: int = 64 * 2**20) -> Tensor:
    """Every rank's ``t`` stacked along dim 0 (rank order), assembled on the CPU.

    Gathered a slab of rows at a time, so the device never holds more than about
    ``chunk_bytes`` × ranks of it: a sharded SAE too large for one device can still be
    checkpointed and exported.
    """
    R = _group_size(group)
    if R == 1:
        return t.detach().cpu()
    n = t.shape[0]
    out = torch.empty((R * n, *t.shape[1:]), dtype=t.dtype)
    row_bytes = max(1, t[:1].numel() * t.element_size())
    step = max(1, chunk_bytes // row_bytes)
    for a in range(0, max(n, 1), step):
        b = min(n, a + step)
        parts = [torch.empty_like(t[a:b]) for _ in range(R)]
        _count(t[a:b])
        dist.all_gather(parts, t[a:b].contiguous(), group=group)
        for r, part in enumerate(parts):
            out[r * n + a : r * n + b] = part.cpu()
    return out


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the shard group (Megatron's f)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return all_reduce_(g.contiguous().clone(), ctx.group), None


class _SumShards(torch.autograd.Function):
    """All-reduce sum forward; identity backward (Megatron's g).

    The loss after it is computed identically on every rank of the group, so each
    rank's partial result already receives the whole gradient.
    """

    @staticmethod
    def forward(ctx, part: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        return all_reduce_(part.clone(), group)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return g, None


# --------------------------------------------------------------- latent-sharded TopK


class ShardedTopKSAE(TopKSAE):
    """A TopK SAE whose latents are split across the ranks of ``group``.

    Rank r holds latents [r·n/R, (r+1)·n/R): its rows of W_enc, W_dec and b_enc; b_dec is
    replicated. A forward pass: every rank computes its pre-activations for the whole
    batch and keeps its local top-k; the candidates (values only, B·k per rank) are
    all-gathered and the global top-k chosen from them (exactly the unsharded top-k,
    since it is contained in the union of the local ones); each rank decodes its own
    winners and the partial reconstructions are all-reduced. Backward needs one more
    all-reduce, of the encoder's input gradient (for b_dec). Gradients and optimiser
    state of the sharded rows never leave their rank.
    """

    sharded: tuple[str, ...] = ("W_dec", "W_enc", "b_enc")

    def __init__(self, full: SAE, group: Any, shard: int, n_shards: int) -> None:
        nn.Module.__init__(self)
        if full.arch != "topk":
            raise ConfigError(
                f"latent sharding supports arch topk, not {full.arch!r}; use --shard-latents 1 "
                "(data parallel) for other architectures"
            )
        N = full.n_latents
        if N % n_shards:
            raise ConfigError(
                f"n_latents={N} is not divisible by --shard-latents {n_shards}; pick a multiple"
            )
        n_local = N // n_shards
        if full.cfg.k > n_local:
            raise ConfigError(
                f"k={full.cfg.k} exceeds the {n_local} latents per shard; use fewer shards"
            )
        self.cfg, self.progress = full.cfg, full.progress
        self.group, self.shard, self.n_shards, self.n_local = group, shard, n_shards, n_local
        lo, hi = shard * n_local, (shard + 1) * n_local
        # Same parameter order as SAE (W_dec, W_enc, b_enc, b_dec): optimiser state lines up.
        self.W_dec = nn.Parameter(full.W_dec.detach()[lo:hi].clone())
        self.W_enc = nn.Parameter(full.W_enc.detach()[lo:hi].clone())
        self.b_enc = nn.Parameter(full.b_enc.detach()[lo:hi].clone())
        self.b_dec = nn.Parameter(full.b_dec.detach().clone())

    def _global_winners(self, vals_BK: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(mask of this rank's candidates that are global winners, global winner values)."""
        B, K = vals_BK.shape
        with torch.no_grad():
            cand_BRK = all_gather_cat(vals_BK.detach(), self.group, dim=1)
            top_vals_Bk, top_pos_Bk = cand_BRK.topk(k, dim=1, sorted=False)
            win_BRK = torch.zeros_like(cand_BRK, dtype=torch.bool).scatter_(1, top_pos_Bk, True)
            mine_BK = win_BRK[:, self.shard * K : (self.shard + 1) * K]
        return mine_BK, top_vals_Bk

    def encode_topk(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's global winners: values [B, k_local] (0 where not a winner), local indices."""
        from llm_sae.kernels import topk_encode

        xin_BD = _CopyToShards.apply(x_BD - self.b_dec, self.group)
        vals_BK, idx_BK = topk_encode(xin_BD, self.W_enc, self.b_enc, self.cfg.k)
        mine_BK, _ = self._global_winners(vals_BK, self.cfg.k)
        return vals_BK * mine_BK, idx_BK

    def forward(
        self, x_BD: Tensor, *, dead_mask_N: Tensor | None = None, aux: bool = True
    ) -> ForwardOutput:
        from llm_sae.kernels import topk_decode, topk_encode

        xin_BD = _CopyToShards.apply(x_BD - self.b_dec, self.group)
        vals_BK, idx_BK = topk_encode(xin_BD, self.W_enc, self.b_enc, self.cfg.k)
        mine_BK, top_vals_Bk = self._global_winners(vals_BK, self.cfg.k)
        vals_BK = vals_BK * mine_BK
        x_hat_BD = (
            _SumShards.apply(topk_decode(vals_BK, idx_BK, self.W_dec), self.group) + self.b_dec
        )
        on_BK = (vals_BK > 0).float()
        fired_N = torch.zeros(self.n_local, device=x_BD.device).index_add_(
            0, idx_BK.flatten(), on_BK.flatten()
        )
        metrics = {"l0": (top_vals_Bk > 0).float().sum(-1).mean()}
        return self._finish(x_BD, x_hat_BD, x_BD.new_zeros(()), metrics, fired_N, dead_mask_N, aux)

    def aux_reconstruction(self, x_BD: Tensor, dead_mask_N: Tensor) -> tuple[Tensor, int, int]:
        """AuxK's ê over the dead latents of all shards (``dead_mask_N`` is this shard's):
        local candidates, global top k_aux, local decode, summed over the shards."""
        from llm_sae.sae import _dead_rows, _decode_sparse

        dead_M = _dead_rows(dead_mask_N, self.W_enc.device)
        count = torch.tensor([dead_M.numel()], device=x_BD.device)
        n_dead = int(all_reduce_(count, self.group).item())
        if n_dead == 0:
            return x_BD.new_zeros(()), 0, 0
        k_aux = min(self.cfg.aux_k or min(512, max(1, self.d_in // 2)), n_dead)
        B = x_BD.shape[0]
        # Pad to k_aux candidates per rank with -1: below any ReLU value, never a winner.
        vals_BK = x_BD.new_full((B, k_aux), -1.0)
        idx_BK = torch.zeros(B, k_aux, dtype=torch.long, device=x_BD.device)
        m = min(k_aux, dead_M.numel())
        if m:
            pre_BM = F.linear((x_BD - self.b_dec).detach(), self.W_enc[dead_M], self.b_enc[dead_M])
            v_Bm, pos_Bm = F.relu(pre_BM).topk(m, dim=-1, sorted=False)
            vals_BK = torch.cat([v_Bm, vals_BK[:, m:]], dim=1)
            idx_BK[:, :m] = dead_M[pos_Bm]
        mine_BK, _ = self._global_winners(vals_BK, k_aux)
        part_BD = _decode_sparse(vals_BK.clamp_min(0) * mine_BK, idx_BK, self.W_dec)
        return _SumShards.apply(part_BD, self.group), n_dead, k_aux

    def full_state_dict(self) -> dict[str, Tensor]:
        """The unsharded state dict, on the CPU (a collective: every rank of the group calls it)."""
        sd = self.state_dict()
        return {
            k: (gather_rows_to_cpu(v, self.group) if k in self.sharded else v.detach().cpu())
            for k, v in sd.items()
        }

    def load_full_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load this rank's slice of an unsharded state dict."""
        lo, hi = self.shard * self.n_local, (self.shard + 1) * self.n_local
        self.load_state_dict({k: (v[lo:hi] if k in self.sharded else v) for k, v in sd.items()})


# -------------------------------------------------------------------- the hooks


class Parallel:
    """One process: every hook is the identity. ``Distributed`` overrides them."""

    rank, world_size, dp_rank, dp_size, n_shards = 0, 1, 0, 1, 1
    is_main = True
    defers_weight_grads = True
    """The trainer may take the weight gradients one at a time (llm_sae.train.Trainer._update);
    data-parallel and sharded training reduce whole gradients, so ``Distributed`` may not."""

    def device(self, name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(name)

    def shard(self, sae: SAE) -> SAE:
        return sae

    def batch_slice(self) -> tuple[int, int] | None:
        """This rank's part (i, n) of each global batch, for ``Store.reader(batch_slice=)``."""
        return None

    def any(self, flag: bool) -> bool:
        return flag

    def after_backward(self, sae: SAE) -> None:
        """Make gradients those of the global batch."""

    def clip_grad_norm_(self, sae: SAE, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_norm)

    def reduce_fired(self, fired_N: Tensor, B: int) -> tuple[Tensor, int]:
        """Fired counts and rows of the global batch (dead-latent statistics agree)."""
        return fired_N, B

    def sync_buffers(self, sae: SAE) -> None:
        """Make running statistics (BatchTopK threshold, ρ̂, ...) agree across ranks."""

    def global_batch(self, *ts: Tensor) -> tuple[Tensor, ...]:
        """The global batch's rows of each tensor, on every rank (for resampling)."""
        return ts

    def mean_metrics(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Logged metrics averaged over the ranks (each computed its own)."""
        return sums

    def full_state(
        self, sae: SAE, opt: torch.optim.Optimizer, dead_N: Tensor
    ) -> tuple[dict, dict, Tensor]:
        """Unsharded (SAE state, optimiser state, tokens-since-fired) for a checkpoint."""
        return sae.state_dict(), opt.state_dict(), dead_N

    def load_full_state(
        self, sae: SAE, opt: torch.optim.Optimizer, dead_N: Tensor, state: dict
    ) -> None:
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        dead_N.copy_(state["tokens_since_fired_N"])

    def full_sae(self, sae: SAE) -> SAE | None:
        """An unsharded CPU copy of ``sae`` on the main rank (None elsewhere)."""
        return copy.deepcopy(sae).cpu()

    def barrier(self) -> None:
        pass


class Distributed(Parallel):
    """The hooks on a (dp × shard) device mesh of the torchrun process group."""

    defers_weight_grads = False

    def __init__(self, n_shards: int = 1) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        rank, world = init_from_env()
        if n_shards < 1 or world % n_shards:
            raise ConfigError(
                f"--shard-latents {n_shards} must divide the world size {world}; "
                "choose a divisor (1: data parallel only)"
            )
        self.rank, self.world_size, self.n_shards = rank, world, n_shards
        self.dp_size = world // n_shards
        self.is_main = rank == 0
        kind = "cuda" if dist.get_backend() == "nccl" else "cpu"
        self.mesh = init_device_mesh(kind, (self.dp_size, n_shards), mesh_dim_names=("dp", "shard"))
        self.dp_group = self.mesh.get_group("dp")
        self.shard_group = self.mesh.get_group("shard")
        self.dp_rank = self.mesh.get_local_rank("dp")
        self.shard_rank = self.mesh.get_local_rank("shard")

    def device(self, name: str) -> torch.device:
        dev = super().device(name)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return dev

    def shard(self, sae: SAE) -> SAE:
        if self.n_shards == 1:
            return sae
        return ShardedTopKSAE(sae, self.shard_group, self.shard_rank, self.n_shards)

    def batch_slice(self) -> tuple[int, int] | None:
        # Every rank follows the one-rank (global) batch order and reads only its share of
        # each batch: step t sees the same global batch whatever the world size, so a run
        # resumed with another number of ranks continues the same run.
        return (self.dp_rank, self.dp_size) if self.dp_size > 1 else None

    def any(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=self._dev())
        return bool(all_reduce_(t, dist.group.WORLD, dist.ReduceOp.MAX).item())

    def _dev(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )

    def after_backward(self, sae: SAE) -> None:
        if self.dp_size == 1:
            return
        params = [p for p in sae.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # One flat bucket: one collective per step instead of one per tensor.
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_(flat, self.dp_group).div_(self.dp_size)
        o = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[o : o + n].view_as(p)
            o += n

    def clip_grad_norm_(self, sae: SAE, max_norm: float) -> None:
        sharded = set(getattr(sae, "sharded", ()))
        if not sharded:
            return super().clip_grad_norm_(sae, max_norm)
        sq_local = torch.zeros((), device=sae.W_enc.device)
        sq_repl = torch.zeros((), device=sae.W_enc.device)
        grads = []
        for name, p in sae.named_parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            sq = torch.linalg.vector_norm(p.grad.float()).pow(2)
            if name in sharded:
                sq_local += sq
            else:
                sq_repl += sq
        total = (all_reduce_(sq_local, self.shard_group) + sq_repl).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ formula
        torch._foreach_mul_(grads, coef)

    def reduce_fired(self, fired_N: Tensor, B: int) -> tuple[Tensor, int]:
        if self.dp_size == 1:
            return fired_N, B
        return all_reduce_(fired_N.clone(), self.dp_group), B * self.dp_size

    def sync_buffers(self, sae: SAE) -> None:
        if self.dp_size == 1:
            return
        for b in sae.buffers():
            if b.is_floating_point():
                all_reduce_(b, self.dp_group).div_(self.dp_size)

    def global_batch(self, *ts: Tensor) -> tuple[Tensor, ...]:
        return tuple(all_gather_cat(t, self.dp_group) for t in ts)

    def mean_metrics(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        # Over all ranks: the ranks of a shard group hold the same batch metrics (the
        # loss is replicated) and equal shares of the latents, so the mean over the world
        # is the data-parallel mean of the metrics and the global dead/dense fractions.
        if self.world_size == 1 or not sums:
            return sums
        keys = sorted(sums)
        t = torch.stack(
            [torch.as_tensor(sums[k], dtype=torch.float32).to(self._dev()) for k in keys]
        )
        all_reduce_(t, dist.group.WORLD).div_(self.world_size)
        return dict(zip(keys, t.unbind(), strict=True))

    def full_state(
        self, sae: SAE, opt: torch.optim.Optimizer, dead_N: Tensor
    ) -> tuple[dict, dict, Tensor]:
        if not isinstance(sae, ShardedTopKSAE):
            return super().full_state(sae, opt, dead_N)
        opt_sd = opt.state_dict()
        names = [n for n, _ in sae.named_parameters()]
        state = {}
        for i, st in opt_sd["state"].items():
            sharded = names[i] in sae.sharded
            state[i] = {
                k: (gather_rows_to_cpu(v, self.shard_group) if sharded and v.ndim > 0 else v)
                for k, v in st.items()
            }
        opt_sd = {**opt_sd, "state": state}
        return sae.full_state_dict(), opt_sd, gather_rows_to_cpu(dead_N, self.shard_group)

    def load_full_state(
        self, sae: SAE, opt: torch.optim.Optimizer, dead_N: Tensor, state: dict
    ) -> None:
        if not isinstance(sae, ShardedTopKSAE):
            return super().load_full_state(sae, opt, dead_N, state)
        lo, hi = sae.shard * sae.n_local, (sae.shard + 1) * sae.n_local
        sae.load_full_state_dict(state["sae"])
        names = [n for n, _ in sae.named_parameters()]
        opt_sd = state["opt"]
        opt_sd = {
            **opt_sd,
            "state": {
                i: {
                    k: (v[lo:hi] if names[i] in sae.sharded and v.ndim > 0 else v)
                    for k, v in st.items()
                }
                for i, st in opt_sd["state"].items()
            },
        }
        opt.load_state_dict(opt_sd)
        dead_N.copy_(state["tokens_since_fired_N"][lo:hi])

    def full_sae(self, sae: SAE) -> SAE | None:
        if not isinstance(sae, ShardedTopKSAE):
            return super().full_sae(sae) if self.is_main else None
        sd = {k: v.cpu() for k, v in sae.full_state_dict().items()}
        if not self.is_main:
            return None
        full = TopKSAE(sae.cfg)
        full.load_state_dict(sd)
        full.progress = sae.progress
        return full

    def barrier(self) -> None:
        dist.barrier()


def make_parallel(n_shards: int = 1) -> Parallel:
    """``Distributed`` under torchrun (WORLD_SIZE > 1), else the one-process ``Parallel``."""
    if env_world_size() > 1 or (dist.is_available() and dist.is_initialized()):
        return Distributed(n_shards)
    if n_shards != 1:
        raise ConfigError(
            f"--shard-latents {n_shards} needs {n_shards} or a multiple of it ranks; launch with "
            f"`torchrun --nproc-per-node {n_shards} -m llm_sae.cli train ...`"
        )
    return Parallel()


class RankFailed(LlmSaeError):
    """One rank of a distributed job raised; the job ends and the last checkpoint stays."""


def _peer_failed(e: BaseException) -> bool:
    """A collective broke because another rank went away (not this rank's own error)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        m in text
        for m in (
            "closed by peer",
            "remote worker",
            "Connection reset",
            "NCCL communicator was aborted",
        )
    )


@contextlib.contextmanager
def report_rank_failure(what: str = "training") -> Iterator[None]:
    """On an exception in a distributed job: say which rank failed and why, tear down the
    process group, and re-raise so the process exits non-zero and torchrun stops the
    other ranks. Checkpoints are written by rank 0 atomically, so the last one is intact.
    A rank whose collective broke because a peer died says only that (``RankFailed``),
    so the root cause is the one traceback in the log.
    """
    try:
        yield
    except BaseException as e:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        if _peer_failed(e):
            raise RankFailed(
                f"rank {rank} of {world} stopped during {what} because another rank failed "
                "(its message is above); the last checkpoint is intact: rerun the same "
                "command to resume"
            ) from None
        print(
            f"llm-sae: rank {rank} of {world} failed during {what}: {type(e).__name__}: {e}\n"
            "torchrun stops the other ranks; the last checkpoint (written atomically by "
            "rank 0) is intact, so rerunning the same command resumes from it.",
            file=sys.stderr,
            flush=True,
        )
        raise
