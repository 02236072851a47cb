"""Where a training process runs and what it draws: the device and DDP setup (:class:`Dist`,
:func:`setup`), collectives the loop needs, and the per-step generators that make a run
reproducible and resumable at any number of GPUs (see :mod:`worldgen.training.fit`)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    """Where this process runs. ``world_size == 1`` is the plain single-device path."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``x``, drawn for the whole global batch with the step's generator
        (the same on every rank): every ``world_size``-th row from ``rank`` on, so the ranks'
        rows together are the global batch, whatever its make-up (e.g. events last).

        Example:
            >>> Dist(rank=1, world_size=2).shard(torch.arange(6))
            tensor([1, 3, 5])
        """
        if len(x) % self.world_size:
            raise ValueError(f"a global batch of {len(x)} does not split evenly over {self.world_size} ranks")
        return x[self.rank :: self.world_size]


def setup(device: str = "auto") -> Dist:
    """Pick the device; under torchrun (WORLD_SIZE > 1) join the process group (NCCL on GPUs,
    gloo on CPU) on ``cuda:LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible")
    if device == "cuda":
        # TF32 matmuls for whatever runs outside bf16 autocast (the loss, EMA): free speed.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world == 1:
        return Dist(device=torch.device(device))
    local = int(os.environ["LOCAL_RANK"])
    dev = torch.device(device, local) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # Rank 0 joins the ranks' latent parts while the others wait: allow that more than the default.
    torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60))
    return Dist(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(), device=dev)


def teardown(d: Dist) -> None:
    if d.world_size > 1 and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        torch_dist.barrier()


def step_seed(seed: int, rank: int, step: int, stream: int = 0) -> int:
    """The seed of ``step``'s draws on ``rank``. Rank 0's stream 0 is what one process has always
    used; ranks (shifted by 2^40) and streams (2^56) do not collide for seeds below ~10^6."""
    return (seed * 1_000_003 + step + (rank << 40) + (stream << 56)) % 2**63


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of every random draw of ``step`` on ``rank``: a resumed run redraws the same.
    Also reseeds torch's global RNG the same way, for randomness inside models (a VAE's sample).
    :func:`fit` hands tasks rank 0's, on every rank (see the module docstring)."""
    s = step_seed(seed, rank, step)
    torch.manual_seed(s)
    g = torch.Generator(device)
    g.manual_seed(s)
    return g


def rank_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """A generator of ``step``'s draws that are this rank's own, not rows of the global batch
    (e.g. the sampler noise of a rollout over this rank's rows), apart from the step's stream."""
    return torch.Generator(device).manual_seed(step_seed(seed, rank, step, stream=1))


def check_ranks_differ(loss: torch.Tensor, d: Dist) -> None:
    """Fail at the first step if every rank computed the same loss: the task drew the same rows on
    each (it must keep only its own, :meth:`Dist.shard`), so N GPUs would train on one GPU's batch."""
    losses = torch.zeros(d.world_size, device=d.device)
    losses[d.rank] = loss.detach().float()
    torch_dist.all_reduce(losses)
    if bool((losses == losses[0]).all()):
        raise RuntimeError(
            f"all {d.world_size} ranks computed the same loss {losses[0].item():.6g}: the task drew the "
            "same batch on every rank; draw the global batch and keep Dist.shard(rows)"
        )


def broadcast_int(value: int, d: Dist) -> int:
    if d.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=d.device)
    torch_dist.broadcast(t, 0)
    return int(t.item())


def mean_over_ranks(value: float, d: Dist) -> float:
    """The mean of a per-rank number over all ranks (a logged loss)."""
    if d.world_size == 1:
        return value
    t = torch.tensor([value], device=d.device)
    torch_dist.all_reduce(t)
    return t.item() / d.world_size
