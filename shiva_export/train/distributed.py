"""Data-parallel training under ``torchrun``: one process per device, ``torch.distributed`` with gloo (CPU)
or NCCL (CUDA).

Design (why a 2-process run equals a 1-process run with the same global batch, within float tolerance):

- Every *random* quantity of a step is drawn for the **global** batch from generators seeded identically on
  every rank (timestep strata, stage-1 ratio groups, policy logit noise, data noise), and each rank keeps its
  rows. Router score noise is derived per global sample and block from ``(seed, step, sample, block)``, so it
  does not depend on which rank or micro-batch holds the sample.
- Each micro-batch loss is scaled by ``rows / global batch``; gradients accumulate over micro-batches and are
  all-reduced (summed) over ranks for the trainable set only (routers, policy, adapters), so the optimizer
  sees the gradient of the global-batch mean on every rank.
- The budget term depends only on the policy (its LUT over the sampler's timesteps, or the global batch's
  keep ratios, which every rank computes): it is computed once per optimizer step, identically everywhere,
  and the EMA budget is updated once per optimizer step.
- Rank 0 writes checkpoints, metrics and outputs. The checkpoint holds only global state, so a run resumes
  at another world size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from shiva_export.errors import ConfigError

__all__ = ["DistContext", "sample_noise"]


@dataclass
class DistContext:
    """This process's place in the run (``world == 1``: not distributed)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> DistContext:
        """Joins the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
        ``MASTER_ADDR``/``PORT``): gloo for a CPU device, NCCL for CUDA. Without ``WORLD_SIZE > 1``, a
        single process."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device} under torchrun needs CUDA, which torch does not see. Use --device cpu (gloo)."
            )
        owns = False
        if not dist.is_initialized():
            if backend == "nccl":
                torch.cuda.set_device(local)
            dist.init_process_group(backend=backend)
            owns = True
        return cls(
            world=dist.get_world_size(), rank=dist.get_rank(), local_rank=local, backend=backend, owns_group=owns
        )

    def device(self, device: str) -> torch.device:
        """The device of this rank (``cuda`` becomes ``cuda:<local rank>`` under torchrun)."""
        d = torch.device(device)
        if d.type == "cuda" and d.index is None and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return d

    def rows(self, global_batch: int) -> range:
        """Global sample indices of this rank (contiguous, equal shares)."""
        if global_batch % self.world:
            raise ConfigError(
                f"global batch {global_batch} does not split over {self.world} processes; pass a --batch that is a multiple of the world size."
            )
        share = global_batch // self.world
        return range(self.rank * share, (self.rank + 1) * share)

    def all_reduce_grads_(self, params) -> None:
        """Sums gradients over ranks. Which parameters have a gradient is decided by the stage, the same on
        every rank, so parameters without one (the policy in the warm-up, DoRA before stage 3) are skipped
        everywhere and the optimizer leaves them alone (a zero gradient would still move them under AdamW)."""
        if self.world <= 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        dist.all_reduce(flat)
        i = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[i : i + n].view_as(g).to(g.dtype))
            i += n

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums a few floats over ranks (loss terms for logging)."""
        if self.world <= 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def sample_noise(seed: int, step: int, samples, block: int, n: int) -> torch.Tensor:
    """Standard-normal score noise ``[len(samples), n]`` for global samples ``samples`` at one step and block:
    the same values whichever rank or micro-batch holds a sample."""
    rows = []
    for s in samples:
        h = hashlib.blake2b(f"{seed}/{step}/{int(s)}/{block}".encode(), digest_size=8).digest()
        g = torch.Generator(device="cpu").manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))
        rows.append(torch.randn(n, generator=g))
    return torch.stack(rows)
