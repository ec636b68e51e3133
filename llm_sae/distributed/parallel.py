"""The trainer's parallel strategy: a no-op for one process, data and latent parallel under torchrun."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor

from llm_sae.common.device import resolve_device
from llm_sae.config import ConfigError
from llm_sae.distributed.comm import all_gather_cat, all_reduce_, gather_rows_to_cpu
from llm_sae.distributed.env import env_world_size, init_from_env
from llm_sae.distributed.sharded_topk import ShardedTopKSAE
from llm_sae.sae.archs.topk import TopKSAE
from llm_sae.sae.base import SAE


class Parallel:
    """One process: every hook is the identity. ``Distributed`` overrides them."""

    rank, world_size, dp_rank, dp_size, n_shards = 0, 1, 0, 1, 1
    is_main = True
    defers_weight_grads = True
    """The trainer may take the weight gradients one at a time (llm_sae.train.Trainer._update);
    data-parallel and sharded training reduce whole gradients, so ``Distributed`` may not."""

    def device(self, name: str) -> torch.device:
        return resolve_device(name)

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
        return resolve_device(name, per_rank=True)

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
            f"`torchrun --nproc-per-node {n_shards} -m llm_sae.cli` and the same command (train or train-clt)"
        )
    return Parallel()
