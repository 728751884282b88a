"""Several processes: torch.distributed from the torchrun environment, and the global token mean.

    torchrun --nproc-per-node 4 -m vopd.train --config config/train/paper.yaml --out RUN_DIR

Data parallelism only: every rank holds the whole student (LoRA or full), samples its own share
of the step's prompts, accumulates gradients locally over its micro-batches, and the gradients are
summed across ranks once per optimizer step (``all_reduce_grads``: a plain SUM all-reduce in
flat buckets, not DDP, so nothing is synchronised per micro-batch and the result does not depend
on DDP's averaging convention).

The normalisation is global (docs/method.md §2): the official code divides every
micro-batch's token sum by N/P with N the completion-token count gathered over all P processes,
and DeepSpeed then averages over ranks, so the step gradient is the exact mean over all N tokens.
Here, with D the global denominator (N for ``token_mean``; the number of non-empty sequences
for ``seq_mean``):

    loss_mb = ESTIMATOR(..., mask = m'_mb, normalize="token_mean") · Σ m'_mb / D

with m' from ``loss_weights`` (m'_t = m_t·s_b for token_mean, m_t·s_b / n_b for seq_mean, s_b an
optional per-sequence weight such as the IS weight of ``vopd.is_correction``). The estimator's
token mean is Σ m' x / Σ m', so each micro-batch contributes Σ_t m'_t x_t / D and the sum over
micro-batches and ranks is the global mean, whatever the split. With one process and one
micro-batch this is exactly the estimator's own normalisation.

Outside torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) every collective here is a no-op.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

_BUCKET_ELEMENTS = 1 << 24  # 16M elements per flat all-reduce buffer


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# ---------------------------------------------------------------------------------------------
# Set-up


def from_env(env: dict | None = None) -> Dist:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (absent: one process)."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(
            f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: expected 0 <= RANK < "
            "WORLD_SIZE and LOCAL_RANK >= 0"
        )
    return Dist(rank, world, local)


def init(device: str = "auto", *, timeout_s: float = 1800.0) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU) and pick this rank's
    device (``cuda:LOCAL_RANK`` under torchrun with CUDA). One process: no group, same device rule.
    """
    info = from_env()
    cuda = torch.cuda.is_available() and device != "cpu"
    if device == "auto":
        dev = torch.device("cuda", info.local_rank) if cuda else torch.device("cpu")
    elif device == "cuda" and info.enabled:
        dev = torch.device("cuda", info.local_rank)
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return info, dev


def shutdown() -> None:
    """Leave the process group. A colocated vLLM engine (``vopd.rollout.vllm``) made process
    groups of its own on top of the default one (which it also creates in a single process);
    destroying the default group first leaves them dangling, and vLLM's exit handler then fails
    on them ("Invalid process group specified"). So vLLM's groups go first, by vLLM's own
    teardown (a no-op when vLLM was never imported, and safe to repeat: its exit handler later
    finds nothing left to destroy)."""
    vllm_groups = sys.modules.get("vllm.distributed.parallel_state")
    if vllm_groups is not None:
        vllm_groups.destroy_model_parallel()
        vllm_groups.destroy_distributed_environment()
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n items; the first n % world ranks get one
    more (shares may be uneven, and the global normalisation keeps the result exact)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}: expected 0 <= rank < world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible sampling seed per rank (rank 0 keeps ``seed``)."""
    return seed + 1_000_003 * rank


# ---------------------------------------------------------------------------------------------
# Collectives


def all_reduce_sum(x: Tensor) -> Tensor:
    """In-place SUM over ranks (a no-op with one process); returns ``x``."""
    if _active():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def global_sum(value: float, device: torch.device | str = "cpu") -> float:
    """Σ over ranks of a Python number, in float64."""
    return float(all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64, device=device)))


@torch.no_grad()
def all_reduce_grads(params, *, bucket_elements: int = _BUCKET_ELEMENTS) -> None:
    """Sum ``.grad`` over ranks in flat buckets (one bucket per dtype/device run). Parameters
    without a gradient on this rank count as zeros, so every rank joins every collective."""
    if not _active():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[Tensor] = []
    size = 0
    for p in params:
        if bucket and (
            size + p.numel() > bucket_elements
            or p.grad.dtype != bucket[0].dtype
            or p.grad.device != bucket[0].device
        ):
            _reduce_bucket(bucket)
            bucket, size = [], 0
        bucket.append(p.grad)
        size += p.numel()
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_metrics(
    metrics: dict[str, float], weight: float, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Weighted mean over ranks of per-rank metric dicts with the same keys (e.g. token means
    weighted by the rank's token count). Keys ending in ``_max``/``_min`` take the max/min."""
    if not _active():
        return dict(metrics)
    keys = sorted(metrics)
    mean_keys = [k for k in keys if not k.endswith(("_max", "_min"))]
    vec = torch.tensor(
        [float(metrics[k]) * weight for k in mean_keys] + [float(weight)],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    out = {
        k: float(v) / max(float(vec[-1]), 1e-300)
        for k, v in zip(mean_keys, vec[:-1].tolist(), strict=True)
    }
    for k in keys:
        if k.endswith(("_max", "_min")):
            op = dist.ReduceOp.MAX if k.endswith("_max") else dist.ReduceOp.MIN
            t = torch.tensor([float(metrics[k])], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=op)
            out[k] = float(t)
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (e.g. the step's prompt order)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------------------------
# Global normalisation


def local_denominator(mask_BT: Tensor, normalize: str) -> float:
    """This batch's share of the global denominator D: Σ m (token_mean) or the number of sequences
    with at least one counted token (seq_mean). Sum it over micro-batches and ranks for D."""
    m = mask_BT.to(torch.float64)
    if normalize == "token_mean":
        return float(m.sum())
    if normalize == "seq_mean":
        return float((m.sum(-1) > 0).sum())
    raise ValueError(f"normalize={normalize!r}: expected 'token_mean' or 'seq_mean'")


def loss_weights(mask_BT: Tensor, normalize: str, seq_weight_B: Tensor | None = None) -> Tensor:
    """m'_BT to pass to an estimator as its mask with ``normalize="token_mean"``:
    m'_t = m_t·s_b (token_mean) or m_t·s_b / n_b (seq_mean, n_b = Σ_t m_t; 0 for empty rows),
    s_b = ``seq_weight_B`` (default 1). Float64 ([B, T] only: cheap), so 1/n_b and the IS
    weights are exact to the estimator's accumulation dtype."""
    dtype = torch.float64
    m = mask_BT.to(dtype)
    if normalize == "seq_mean":
        n_B = m.sum(-1, keepdim=True)
        m = torch.where(n_B > 0, m / n_B.clamp_min(1e-30), torch.zeros_like(m))
    elif normalize != "token_mean":
        raise ValueError(f"normalize={normalize!r}: expected 'token_mean' or 'seq_mean'")
    if seq_weight_B is not None:
        if seq_weight_B.shape != (m.shape[0],):
            raise ValueError(
                f"seq_weight_B has shape {tuple(seq_weight_B.shape)}: expected ({m.shape[0]},)"
            )
        m = m * seq_weight_B.to(device=m.device, dtype=dtype)[:, None]
    return m


def loss_scale(weights_BT: Tensor, denominator: float) -> float:
    """Σ m' / D: multiply the estimator's (token-mean) loss by this (0 when D is 0)."""
    return float(weights_BT.sum()) / denominator if denominator > 0 else 0.0
