"""Cross-layer transcoders (CLTs): an encoder per layer, decoders from layer l to every
layer t ≥ l, trained jointly so that one feature can write to several later MLP outputs.

What circuit tracing runs on (Ameisen et al. 2025): a feature read at layer l that
contributes to MLP outputs l, l+1, … collapses a chain of per-layer features into one node.
Layout, as circuit-tracer's ``CrossLayerTranscoder`` holds it: ``W_enc`` [L, N, D],
``b_enc`` [L, N], ``W_dec[l]`` [N, L − l, E] (latent n of layer l writing to layer l + j),
``b_dec`` [L, E]. The activation is a per-layer BatchTopK: in training each layer keeps
its batch's top k·B pre-activations; the smallest kept value, estimated on held batches
when training ends (``calibrate_thresholds``), is the threshold θ_l that inference uses, z = pre·[pre > θ_l]: a JumpReLU, which
circuit-tracer computes exactly.

Memory, per source layer l (float32 training with Adam: weights, gradients and two moments,
16 bytes a value): 16·N·(D + 1 + (L − l)·E) bytes; all layers: 16·N·(L·(D + 1) + E·L(L+1)/2)
(+ 16·L·E for b_dec). Layer 0's decoders are L times a per-layer transcoder's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from llm_sae.config import ConfigError
from llm_sae.errors import CheckpointError


@dataclass
class CLTConfig:
    """A CLT's shape and sparsity."""

    n_layers: int
    d_in: int
    d_out: int
    n_latents: int
    """Latents per layer."""
    k: int
    """Active latents per token per layer, on average over a batch (BatchTopK)."""
    threshold_decay: float = 0.99
    """Decay of the running estimate of each layer's inference threshold."""

    def check(self) -> CLTConfig:
        if min(self.n_layers, self.d_in, self.d_out, self.n_latents) <= 0:
            raise ConfigError(f"a CLT needs positive sizes, got {self}")
        if not 0 < self.k < self.n_latents:
            raise ConfigError(f"k={self.k} must be at least 1 and below n_latents={self.n_latents}")
        return self


def clt_memory_bytes(cfg: CLTConfig, layer: int) -> int:
    """Training memory of source layer ``layer``'s parameters (weights, grads, Adam)."""
    return 16 * cfg.n_latents * (cfg.d_in + 1 + (cfg.n_layers - layer) * cfg.d_out)


class CrossLayerTranscoder(nn.Module):
    """``forward(x_BLD, y_BLE)`` → (loss, metrics); ``predict(x_BLD)`` → y_BLE."""

    def __init__(self, cfg: CLTConfig) -> None:
        super().__init__()
        self.cfg = cfg.check()
        L, N, D, E = cfg.n_layers, cfg.n_latents, cfg.d_in, cfg.d_out
        W_enc_LND = torch.randn(L, N, D)
        self.W_enc = nn.Parameter(W_enc_LND / W_enc_LND.norm(dim=-1, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(L, N))
        # Each latent's decoder over all the layers it writes to starts at unit norm.
        self.W_dec = nn.ParameterList([nn.Parameter(torch.randn(N, L - l, E)) for l in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, E))
        self.register_buffer("threshold", torch.full((L,), -1.0))  # < 0: not estimated yet
        self.batch_ranks, self.gather_batch = 1, None
        self.full_cfg = cfg  # a shard's cfg counts its own latents; this, all of them
        self.constrain_weights()

    def share_batch(self, n_ranks: int, gather: Callable[[Tensor], Tensor]) -> None:
        """Train on 1/n_ranks of each global batch (data parallel): the per-layer top k·B
        is then of the global batch, chosen from every rank's candidates, which ``gather``
        concatenates along dim 1 ([L, C] → [L, n_ranks·C], the same on every rank)."""
        self.batch_ranks, self.gather_batch = n_ranks, gather

    def sum_shards(self, part: Tensor) -> Tensor:
        """The sum over the ranks that hold the other latents (none here: the identity)."""
        return part

    # Unsharded, the local state is the whole state (llm_sae.distributed.sharded_clt).
    def local_slice(self, name: str, v: Tensor) -> Tensor:
        """This rank's part of the whole-CLT state ``name``."""
        return v

    def full_tensor(self, name: str, v: Tensor) -> Tensor:
        """The whole-CLT state ``name`` from this rank's ``v``, on the CPU."""
        return v.detach().cpu()

    def unsharded(self) -> CrossLayerTranscoder:
        return self

    def batch_threshold(self, acts_LM: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        """(θ_L, candidates_LC): each layer's k·B-th largest of ``acts_LM`` (≥ 0, this
        rank's ``rows`` × its latents) over the global batch of B rows (and, sharded, all
        latents), and the values it was chosen from, which hold that batch's top k·B."""
        kept = self.cfg.k * rows * self.batch_ranks
        cand_LC = acts_LM.detach().topk(min(kept, acts_LM.shape[1]), dim=-1, sorted=False).values
        if self.gather_batch is not None:
            cand_LC = self.gather_batch(cand_LC.contiguous())
            cand_LC = cand_LC.topk(min(kept, cand_LC.shape[1]), dim=-1, sorted=False).values
        return cand_LC.amin(-1), cand_LC

    def pre_acts(self, x_BLD: Tensor) -> Tensor:
        return torch.einsum("bld,lnd->bln", x_BLD, self.W_enc) + self.b_enc

    def activate(self, pre_BLN: Tensor) -> Tensor:
        """Training: each layer's top k·B of its batch (the running threshold follows the
        smallest kept value); eval: the JumpReLU pre·[pre > θ_l]."""
        if not self.training:
            return self.jump_relu(pre_BLN, self.threshold.clamp_min(0)[None, :, None])
        B, L, N = pre_BLN.shape
        flat_LM = pre_BLN.relu().transpose(0, 1).reshape(L, B * N)
        theta_L, vals_LK = self.batch_threshold(flat_LM, B)
        # ≥ θ keeps exactly the top k·B (ties aside); where fewer are positive, θ = 0 and
        # the zeros it also keeps are zeros either way.
        z_LM = flat_LM * (flat_LM >= theta_L[:, None])
        with torch.no_grad():
            kept_L = torch.where(vals_LK > 0, vals_LK, torch.inf).amin(-1).float()
            kept_L = torch.where(torch.isfinite(kept_L), kept_L, self.threshold)
            fresh_L = self.threshold < 0
            decay = self.cfg.threshold_decay
            self.threshold.copy_(torch.where(fresh_L, kept_L, decay * self.threshold + (1 - decay) * kept_L))
        return z_LM.reshape(L, B, N).transpose(0, 1)

    @staticmethod
    def jump_relu(pre: Tensor, theta: Tensor) -> Tensor:
        return pre * (pre > theta)

    def encode_layer(self, layer: int, x_BD: Tensor) -> Tensor:
        """Layer ``layer``'s latents z_BN (eval mode's JumpReLU) from its own input alone: a
        replacement model encodes each layer when its forward pass reaches that layer."""
        pre_BN = x_BD @ self.W_enc[layer].T + self.b_enc[layer]
        return self.jump_relu(pre_BN, self.threshold[layer].clamp_min(0))

    def decode_layer(self, layer: int, z_by_layer: list[Tensor]) -> Tensor:
        """MLP output ``layer`` from the latents of layers 0..layer (``z_by_layer[l]`` [B, N]):
        Σ_{l ≤ t} z_l · W_dec[l][:, t − l] + b_dec_t, the row ``decode`` gives layer t."""
        y_BE = sum(z_by_layer[l] @ self.W_dec[l][:, layer - l] for l in range(layer + 1))
        return self.sum_shards(y_BE) + self.b_dec[layer]

    @torch.no_grad()
    def calibrate_thresholds(self, x_BLD: Tensor) -> None:
        """Set each layer's inference threshold to the smallest of the top k·B
        pre-activations of ``x_BLD``: eval mode then fires k per token per layer on average.
        The running estimate lags on short runs (it starts from the first batches, whose
        pre-activations are larger), so training ends with this."""
        for l in range(self.cfg.n_layers):  # one layer's [B, N] at a time
            pre_1M = (x_BLD[:, l] @ self.W_enc[l].T + self.b_enc[l]).relu().reshape(1, -1)
            self.threshold[l] = self.batch_threshold(pre_1M, x_BLD.shape[0])[0][0]

    def encode(self, x_BLD: Tensor) -> Tensor:
        return self.activate(self.pre_acts(x_BLD))

    def decode(self, z_BLN: Tensor) -> Tensor:
        """y_BLE: layer t gets Σ_{l ≤ t} z_l · W_dec[l][:, t − l] + b_dec_t."""
        parts = [torch.zeros_like(z_BLN[:, 0, :1]).expand(-1, self.cfg.d_out)] * self.cfg.n_layers
        for l, W_NJE in enumerate(self.W_dec):
            out_BJE = torch.einsum("bn,nje->bje", z_BLN[:, l], W_NJE)
            for j in range(W_NJE.shape[1]):
                parts[l + j] = parts[l + j] + out_BJE[:, j]
        return self.sum_shards(torch.stack(parts, 1)) + self.b_dec

    def predict(self, x_BLD: Tensor) -> Tensor:
        return self.decode(self.encode(x_BLD))

    def forward(self, x_BLD: Tensor, y_BLE: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Squared error summed over every layer's output, averaged over rows; metrics are
        each layer's FVU and L0 (detached)."""
        z_BLN = self.encode(x_BLD)
        err_BLE = y_BLE - self.decode(z_BLN)
        sq_BL = err_BLE.pow(2).sum(-1)
        with torch.no_grad():
            var_L = y_BLE.var(0, correction=0).sum(-1).clamp_min(1e-12)
            fvu_L, l0_L = sq_BL.mean(0) / var_L, self.sum_shards((z_BLN > 0).sum(-1).float()).mean(0)
        metrics = {f"fvu_{l}": fvu_L[l] for l in range(self.cfg.n_layers)}
        metrics.update({f"l0_{l}": l0_L[l] for l in range(self.cfg.n_layers)})
        return sq_BL.sum(-1).mean(), metrics

    @torch.no_grad()
    def constrain_weights(self) -> None:
        """Each latent's whole decoder (all the layers it writes to) back to unit norm: the
        scale lives in the latents, so the sparsity budget k means the same everywhere."""
        for W_NJE in self.W_dec:
            W_NJE /= W_NJE.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]

    @torch.no_grad()
    def fold_scales(self, s_in_L: list[float], s_out_L: list[float]) -> None:
        """Take raw activations when trained on s_in_l·x_l to predict s_out_t·y_t: the
        pre-activations (and thresholds) stay; decoders into layer t are divided by s_out_t."""
        for l in range(self.cfg.n_layers):
            self.W_enc[l] *= s_in_L[l]
            self.b_dec[l] /= s_out_L[l]
            for j in range(self.cfg.n_layers - l):
                self.W_dec[l][:, j] /= s_out_L[l + j]

    def save(self, path: str | Path) -> Path:
        """``cfg.json`` (with ``"arch": "clt"``) and ``clt.safetensors``."""
        from safetensors.torch import save

        from llm_sae.common.atomic import atomic_write_bytes

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / "clt.safetensors",
                           save({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}))
        atomic_write_bytes(path / "cfg.json", (json.dumps({"arch": "clt", **asdict(self.cfg)}, indent=2) + "\n").encode())
        return path


def load_clt(path: str | Path) -> CrossLayerTranscoder:
    """A CLT saved by ``CrossLayerTranscoder.save`` (eval mode, float32, CPU)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        cfg = json.loads((path / "cfg.json").read_text())
        state = load_file(str(path / "clt.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a saved cross-layer transcoder ({e}); give the folder train-clt wrote") from None
    cfg.pop("arch", None)
    clt = CrossLayerTranscoder(CLTConfig(**cfg))
    clt.load_state_dict(state)
    return clt.eval()
