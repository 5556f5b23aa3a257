"""One run over several processes (torchrun, or SLURM tasks): DistributedDataParallel around the student and
its adapters, each process training on its share of every global batch.

What a user can rely on:
- `batch_size` is the global batch; each of N processes trains on a contiguous 1/N of every batch a single process
  would draw, in its order. In-memory data: the same crops and flips too (each process draws the whole batch's and
  keeps its share). An image folder decodes only each process's share, augmented per process.
- Gradients are averaged so that a step equals the single-process step on the whole batch: a process's loss is
  weighted by its share of the batch (the last batch of an epoch may split unevenly).
- Losses, accuracies and test figures are reduced over the processes (sums of per-image terms and counts), so
  metrics.csv is the file one process would write, to float rounding, when the models have no batch statistics
  (or `ddp.sync_bn=true` on CUDA); a batch norm sees its process's share of the batch otherwise, as in every DDP.
- Only rank 0 writes run files (run directory, checkpoints, teacher cache) and decides what all do (the run
  directory; the teacher, trained or downloaded while the others wait); its failures reach every process, and
  every process stops at the same step when any is signalled or meets a non-finite loss.

Written here rather than taken from a library: the training loop is kdrun's own (stages, resume, metrics), and
what it needs of torch.distributed is a few collectives around it."""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kdrun.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    backend: str


_world: World | None = None


def launched_world_size() -> int:
    """How many processes the launcher started for this run (torchrun's WORLD_SIZE; 1 without one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def export_slurm_environment() -> None:
    """Several SLURM tasks of one job (the submitit launcher with tasks_per_node > 1): torch's variables from
    SLURM's, through submitit's own helper."""
    # SLURM_STEP_NUM_TASKS is set inside an srun step (as submitit starts a job's tasks), not in a batch script,
    # so a plain `kdrun` in an sbatch script with --ntasks=4 stays one process.
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) <= 1:
        return
    if "SLURM_PROCID" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export()


def setup(ddp_cfg, device_key: str) -> World | None:
    """Join the process group when this process is one of several; None for a single-process run."""
    global _world
    if _world is not None:
        return _world
    export_slurm_environment()
    size = launched_world_size()
    if size <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = str(device_key) != "cpu" and torch.cuda.is_available()
    backend = ddp_cfg.get("backend") or "auto"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    timeout = datetime.timedelta(minutes=float(ddp_cfg.get("timeout_min") or 720))
    dist.init_process_group(backend=backend, timeout=timeout)
    _world = World(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    return _world


def world() -> World | None:
    return _world


def active() -> bool:
    return _world is not None


def is_main() -> bool:
    """Rank 0, or a single-process run: the process that writes files and prints."""
    return _world is None or _world.rank == 0


def device_for(device: torch.device) -> torch.device:
    """Each process of a CUDA run takes its own GPU (LOCAL_RANK), whatever `device` said."""
    if _world is None or device.type != "cuda":
        return device
    return torch.device("cuda", _world.local_rank % torch.cuda.device_count())


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it may train and store the teacher, download published weights); the others
    run it once it is done, finding what rank 0 stored. When the block fails on rank 0, the others fail with its
    error instead of running it (or waiting on)."""
    if _world is None:
        yield
        return
    if _world.rank == 0:
        try:
            yield
        except BaseException as exc:
            dist.broadcast_object_list([f"{type(exc).__name__}: {exc}"], src=0)
            raise
        dist.broadcast_object_list([None], src=0)
        return
    box = [None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        from kdrun.errors import RunError

        raise RunError(f"rank 0 failed: {box[0]}")
    yield


def from_main(decide):
    """Rank 0's `decide()` on every process (the run directory it chose, its resume decision); when it raises a
    ConfigError, every process raises it, rather than the others waiting for an answer."""
    if _world is None:
        return decide()
    box = [None]
    if _world.rank == 0:
        try:
            box = [(True, decide())]
        except ConfigError as exc:
            box = [(False, str(exc))]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise ConfigError(value)
    return value


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process: a stop or a failure that all of them act on at the same step."""
    if _world is None:
        return flag
    on = torch.device("cuda", torch.cuda.current_device()) if _world.backend == "nccl" else torch.device("cpu")
    value = torch.tensor(int(flag), device=on)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def check_stop_together() -> None:
    """`interrupt.check_stop` for a step every process reaches: all of them stop when any was signalled, so that
    none is left waiting in the next step's gradient reduction."""
    from kdrun.interrupt import Interrupted, stop_requested

    if any_process(stop_requested() is not None):
        raise Interrupted(f"stopped by {stop_requested() or 'a signal to another process'}")


def share_buffers_of_main(method: nn.Module) -> None:
    """Rank 0's batch-norm statistics on every process before an evaluation: the model each process evaluates
    its share with is then the one rank 0 saves (DDP syncs buffers only at the start of each step)."""
    if _world is None:
        return
    for buffer in method.buffers():
        dist.broadcast(buffer, src=0)


def sum_over_processes(*tensors: torch.Tensor) -> None:
    """Each tensor summed over the processes, in place."""
    if _world is None:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def count_over_processes(count: int, counted_before: int) -> int:
    """A counter every process adds to on its own (images the teacher saw): `counted_before` (the total at the last
    call, the same on all) plus what each process added since."""
    if _world is None:
        return count
    on = torch.device("cuda", torch.cuda.current_device()) if _world.backend == "nccl" else torch.device("cpu")
    added = torch.tensor(float(count - counted_before), dtype=torch.float64, device=on)
    dist.all_reduce(added, op=dist.ReduceOp.SUM)
    return counted_before + int(added.item())


def close(finished: bool) -> None:
    """Leave the process group. A finished run's processes leave it together (one leaving while another still
    writes its files can abort the other at shutdown); after a failure each just goes, since the others may be
    gone already and a barrier would wait for them."""
    global _world
    if _world is not None and dist.is_initialized() and finished:
        dist.barrier()
        dist.destroy_process_group()
    _world = None


def shard(loader):
    """This process's share of `loader`'s batches. An image folder decodes only its share (`take_share`); an
    in-memory loader draws each whole batch (cheap: crops and flips on the device) and is sliced."""
    if _world is None:
        return loader
    if hasattr(loader, "take_share"):
        loader.take_share(_world.rank, _world.size)
        return loader
    from kdrun.data.shards import ShardedLoader

    return ShardedLoader(loader, _world.rank, _world.size)


def wrap_for_step(method: nn.Module) -> nn.Module:
    """The method inside DistributedDataParallel: the student, its adapters and peers. The teacher is not among
    the method's modules (base.Method hides it), so each process runs its frozen copy on its own share. Built per
    stage: a stage may train other parameters. Unused parameters are allowed, since a stage or a schedule may
    leave some of a method's modules out of a step."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [method_device(method).index] if method_device(method).type == "cuda" else None
    return DistributedDataParallel(method, device_ids=device_ids, find_unused_parameters=True,
                                   gradient_as_bucket_view=True)


def method_device(method: nn.Module) -> torch.device:
    return next(method.parameters()).device
