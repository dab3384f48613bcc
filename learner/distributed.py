"""Data-parallel learner: process group, model wrapping (DDP or FSDP2) and the few collectives the loop needs.

Why so little: every rank runs the same loop on its own share of the stream (the consumer group hands
each entry to exactly one rank, so sharding needs no coordination), and the ranks only have to agree on
three things per step: whether to stop, how many samples the step has in total (the loss normalizer) and
how many micro-batches to run (every forward/backward is a collective under FSDP, and exactly one
backward per step must all-reduce under DDP). Everything else (publishing, checkpoints, advertising,
evaluation) is rank 0's, with a barrier where another rank's next action depends on it.

A single process (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) gets a `Distributed` whose
collectives are plain Python and whose wrapping is the identity: the default path runs no distributed
code at all. Under ``torchrun`` the backend is NCCL when the learner's device is CUDA, gloo otherwise.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class Distributed:
    """Rank layout of this process and the collectives the learner loop uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str, *, timeout_s: float) -> Distributed:
        """Join the process group torchrun describes in the environment, or stay single-process.

        ``device`` is the learner's resolved device name; on CUDA each rank takes ``cuda:LOCAL_RANK``.
        ``timeout_s`` bounds every collective: a rank that stops answering fails the others with an error
        naming the collective instead of hanging them.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d/%d (local %d) joined the %s process group", rank, world, local_rank, backend)
        return cls(rank=rank, world_size=world, local_rank=local_rank, backend=backend)

    def device(self, resolved: str) -> torch.device:
        """One GPU per rank: ``cuda`` becomes ``cuda:LOCAL_RANK``; CPU stays CPU."""
        if self.enabled and resolved == "cuda":
            return torch.device(f"cuda:{self.local_rank}")
        return torch.device(resolved)

    def share(self, total: int) -> int:
        """This rank's part of a global count (the first ``total % world`` ranks take one more)."""
        return total // self.world_size + (1 if self.rank < total % self.world_size else 0)

    # -- collectives (identity in a single process) ---------------------------------------------------
    def _reduce(self, values: list[float], op: str) -> list[float]:
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return [float(v) for v in tensor.tolist()]

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, "sum")

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, "max")

    def gather(self, value: int) -> list[int]:
        """Every rank's ``value``, in rank order (``all_gather`` of one integer; no pickling)."""
        if not self.enabled:
            return [int(value)]
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        mine = torch.tensor([int(value)], dtype=torch.int64, device=device)
        out = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return [int(t.item()) for t in out]

    def shares(self, total: int) -> list[int]:
        """`share` of every rank, in rank order."""
        return [total // self.world_size + (1 if r < total % self.world_size else 0) for r in range(self.world_size)]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def allocate(counts: list[int], target: int, shares: list[int]) -> list[int]:
    """How many of its held samples each rank trains this step, ``sum <= target``.

    Each rank first takes up to its share; what is left of ``target`` goes to ranks holding more, in rank
    order. Why not strict shares: the consumer group hands entries to whichever rank reads first, so one
    rank may hold a surplus while another has none (the tail of a run); strict shares would make the
    empty rank wait ``read_timeout_s`` while the data for the step is already there. Deterministic, so
    every rank computes the same split from the same gathered counts.
    """
    take = [min(c, s) for c, s in zip(counts, shares, strict=True)]
    left = target - sum(take)
    for r, c in enumerate(counts):
        extra = min(left, c - take[r])
        take[r] += extra
        left -= extra
    return take


# ---------------------------------------------------------------------------------------------------
# model wrapping


def _block_classes(model: torch.nn.Module) -> tuple[type[torch.nn.Module], ...]:
    """The transformer block classes HF marks as unsplittable: the natural FSDP units."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


class TrainModel:
    """The student as the training step sees it: forward, gradient-sync control, and full weights.

    ``module`` is always the unwrapped Hugging Face model (what checkpoints and evaluation use); under
    DDP ``forward`` goes through the wrapper so gradients are all-reduced, under FSDP2 the module itself
    is sharded in place (``fully_shard``) and its weights are gathered only to save them.
    """

    def __init__(self, module: torch.nn.Module, dist_ctx: Distributed, *, fsdp: bool) -> None:
        self.module = module
        self.dist = dist_ctx
        self.mode = "single"
        self._ddp: Any = None
        if dist_ctx.enabled and fsdp:
            from torch.distributed.fsdp import fully_shard

            blocks = _block_classes(module)
            for sub in module.modules():
                if blocks and isinstance(sub, blocks):
                    fully_shard(sub)
            fully_shard(module)
            self.mode = "fsdp"
        elif dist_ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [dist_ctx.local_rank] if dist_ctx.backend == "nccl" else None
            self._ddp = DistributedDataParallel(module, device_ids=device_ids)
            self.mode = "ddp"
        elif fsdp:
            log.warning("learner.fsdp is set but this is a single process (no torchrun): training unsharded")

    def __call__(self, **inputs: torch.Tensor) -> Any:
        return (self._ddp or self.module)(**inputs)

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool) -> Iterator[None]:
        """Gradient accumulation: only the last micro-batch of a step all-reduces (or reduce-scatters)."""
        if self.mode == "ddp" and not enabled:
            with self._ddp.no_sync():
                yield
        elif self.mode == "fsdp":
            self.module.set_requires_gradient_sync(enabled)  # type: ignore[operator]
            yield
        else:
            yield

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.module.parameters()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU weights on rank 0 (empty on the others under FSDP). A collective under FSDP."""
        if self.mode != "fsdp":
            return self.module.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Optimizer state to checkpoint: as is, or gathered and keyed by parameter name under FSDP."""
        if self.mode != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.mode != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

    @property
    def optimizer_keys(self) -> str:
        """How checkpointed optimizer state is keyed: torch's parameter indices, or names (FSDP)."""
        return "names" if self.mode == "fsdp" else "indices"


def checksum(module: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes in name order: equal on every rank iff the replicas are equal.

    Under FSDP each parameter is gathered (``full_tensor``, a collective), so every rank must call it.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        local = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        digest.update(name.encode())
        digest.update(local.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
