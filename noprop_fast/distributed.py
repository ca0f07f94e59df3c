"""Multi-process training launched with torchrun (`--parallel blocks|data|blocks+data`): the
launch and its failures, the layout of W = K block ranks x D data ranks (rank r: block slice
r // D, data share r % D), the process groups, the gradient all-reduces and the communication
volume. strategy.py's `ManyProcesses` holds the rest of a rank's share. Design: docs/distributed.md.
"""
import datetime
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import runs
from .errors import ConfigError, UserError
from .layers import BlockBatchNorm, block_parameters

BUCKET_BYTES = 25 * 2**20  # gradient bucket size of one all-reduce (DDP's default)
_FAILURE_MARKERS = ("gloo", "nccl", "timed out", "timeout", "connection closed", "connection reset",
                    "broken pipe", "socket")


class DistributedFailure(UserError):
    """Another process failed, or a collective did not complete within the time-out."""


def split_blocks(num_blocks: int, block_ranks: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) slices of range(T) for K ranks; the first T mod K get one more."""
    if block_ranks > num_blocks:
        raise ConfigError(f"{block_ranks} block ranks cannot split {num_blocks} blocks: "
                          f"use at most {num_blocks} block ranks or more blocks")
    base, extra = divmod(num_blocks, block_ranks)
    starts = [k * base + min(k, extra) for k in range(block_ranks + 1)]  # K + 1 boundaries
    return list(zip(starts, starts[1:]))


@dataclass(frozen=True)
class Layout:
    rank: int
    world_size: int
    block_ranks: int                    # K
    data_ranks: int                     # D
    num_blocks: int                     # T, the run's global block count
    spans: tuple                        # every block rank's (start, stop)

    @property
    def block_index(self) -> int:
        return self.rank // self.data_ranks

    @property
    def data_index(self) -> int:
        return self.rank % self.data_ranks

    @property
    def span(self) -> tuple[int, int]:
        return self.spans[self.block_index]

    @property
    def local_blocks(self) -> int:
        return self.span[1] - self.span[0]

    @property
    def holds_last_block(self) -> bool:
        return self.block_index == self.block_ranks - 1

    def rank_of(self, block_index: int, data_index: int) -> int:
        return block_index * self.data_ranks + data_index


def plan_layout(parallel: str, block_ranks: int, world_size: int, rank: int, num_blocks: int,
                method: str = "noprop", block_schedule: str = "all") -> Layout:
    """The (K, D) factorisation of the world for `parallel`, or a ConfigError in one line."""
    w = world_size
    if parallel == "blocks":
        if block_ranks not in (0, w):
            raise ConfigError(f"--parallel blocks uses all {w} processes as block ranks; "
                              f"--block-ranks {block_ranks} does not match (use blocks+data)")
        k = w
    elif parallel == "data":
        if block_ranks not in (0, 1):
            raise ConfigError(f"--parallel data keeps every block on every process; "
                              f"--block-ranks {block_ranks} asks to split them (use blocks+data)")
        k = 1
    elif parallel == "blocks+data":
        if block_ranks < 1:
            raise ConfigError("--parallel blocks+data needs --block-ranks K (K x data ranks = "
                              f"the {w} processes)")
        if w % block_ranks:
            raise ConfigError(f"world size {w} is not a multiple of --block-ranks {block_ranks}: "
                              f"launch K x D processes")
        k = block_ranks
    else:
        raise ConfigError(f"parallel: {parallel!r} is not one of blocks, data, blocks+data")
    if k > 1 and method != "noprop":
        raise ConfigError("the backprop baseline trains its blocks as one chain: it cannot split "
                          "them across processes (use --parallel data)")
    if k > 1 and block_schedule != "all":
        raise ConfigError("the sequential schedule trains one block at a time: split the blocks "
                          "with --block-schedule all")
    return Layout(rank, w, k, w // k, num_blocks, tuple(split_blocks(num_blocks, k)))


@dataclass
class Groups:
    """The process groups of a layout (None where the group would be a single process)."""
    data: object = None           # my data peers: same blocks, other shares
    blocks: object = None         # my block peers: same share, other blocks
    first_blocks: object = None   # the block peers of data share 0 (checkpoint gathering)


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise ConfigError(f"--parallel needs the launcher's {name}: start the run with torchrun "
                          "(see docs/distributed.md), or add --parallel none to run in one "
                          "process (a resumed run keeps its config's --parallel)") from None


def _make_groups(layout: Layout, timeout) -> Groups:
    """Every rank creates every group, in the same order (torch.distributed requires it)."""
    groups, k, d = Groups(), layout.block_ranks, layout.data_ranks
    if d > 1:
        for b in range(k):
            group = dist.new_group([layout.rank_of(b, i) for i in range(d)], timeout=timeout)
            if b == layout.block_index:
                groups.data = group
    if k > 1:
        for i in range(d):
            group = dist.new_group([layout.rank_of(b, i) for b in range(k)], timeout=timeout)
            if i == layout.data_index:
                groups.blocks = group
            if i == 0:
                groups.first_blocks = group
    return groups


@contextmanager
def session(cfg):
    """Yield (layout, groups) for a torchrun-launched run with cfg.parallel != "none": init,
    groups, rank 0 alone writes; afterwards the process group is destroyed. A failed collective
    becomes one line naming the rank (DistributedFailure)."""
    world, rank, local_rank = (_env_int(n) for n in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    try:
        layout = plan_layout(cfg.parallel, cfg.block_ranks, world, rank, cfg.num_blocks,
                             cfg.method, getattr(cfg, "block_schedule", "all"))
        if cfg.precision == "fp16":
            raise ConfigError("--parallel with fp16: each process would skip overflowing steps "
                              "on its own; use bf16")
        if cfg.cuda_graphs == "on":
            raise ConfigError("--parallel runs its steps uncaptured (collectives in every step); "
                              "drop --cuda-graphs on")
    except ConfigError as err:
        raise ConfigError(f"rank {rank}: {err}") from None
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)  # "cuda" then means this process's GPU
    timeout = datetime.timedelta(seconds=cfg.dist_timeout)
    try:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
        groups = _make_groups(layout, timeout)
    except (RuntimeError, ValueError) as err:
        raise DistributedFailure(f"rank {rank}: could not join the process group "
                                 f"({_one_line(err)})") from None

    def stopped_by_launcher(signum, frame):
        raise DistributedFailure(f"rank {rank}: stopped by the launcher (another process failed; "
                                 "its message says why)")
    previous = signal.signal(signal.SIGTERM, stopped_by_launcher)
    quiet = rank != 0
    stdout = sys.stdout
    if quiet:  # rank 0 alone prints and writes; the others keep stderr for errors
        runs.set_writer(False)
        sys.stdout = open(os.devnull, "w")
    try:
        yield layout, groups
    except RuntimeError as err:
        if not is_collective_failure(err):
            raise
        raise DistributedFailure(
            f"rank {rank}: a collective failed ({_one_line(err)}): another process stopped or did "
            f"not answer within --dist-timeout {cfg.dist_timeout:g} s; the run stops") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if quiet:
            sys.stdout.close()
            sys.stdout = stdout
            runs.set_writer(True)
        if dist.is_initialized():
            dist.destroy_process_group()


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200]


def is_collective_failure(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, getattr(dist, "DistError", ())) or (
        dist.is_initialized() and any(marker in text for marker in _FAILURE_MARKERS))


# -- gradients ---------------------------------------------------------------------------------
def _all_reduce_flat(tensors: list[torch.Tensor], group) -> None:
    """Sum `tensors` over `group` in place, as flat buckets of at most BUCKET_BYTES."""
    bucket, size = [], 0
    for t in tensors + [None]:
        if t is not None and (not bucket or size + t.numel() * t.element_size() <= BUCKET_BYTES):
            bucket.append(t)
            size += t.numel() * t.element_size()
            continue
        if bucket:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat, group=group)
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(part.view_as(b))
        bucket, size = ([t], t.numel() * t.element_size()) if t is not None else ([], 0)


def split_parameters(model) -> tuple[list, list]:
    """(block parameters, shared parameters) that train (frozen ones are left out)."""
    ids = {id(p) for p in block_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) in ids], [p for p in params if id(p) not in ids]


def reduce_gradients(model, layout: Layout, groups: Groups, extras: list[torch.Tensor]) -> None:
    """Block gradients summed over the data peers; shared gradients and `extras` (the step's
    loss figures) over all ranks. Each rank has already scaled its loss by its share n_d / N."""
    block, shared = split_parameters(model)
    for p in block + shared:
        if p.grad is None:  # e.g. the classifier on a rank without the last block
            p.grad = torch.zeros_like(p)
    if layout.block_ranks == 1:  # every rank holds every block: one reduction over all
        block, shared = [], block + shared
    if block and layout.data_ranks > 1:
        _all_reduce_flat([p.grad for p in block], groups.data)
    if layout.world_size > 1:
        _all_reduce_flat([p.grad for p in shared] + extras, None)


# -- communication volume ----------------------------------------------------------------------
def communication_volume(model, layout: Layout) -> dict:
    """Bytes per training step each rank hands to all-reduce (payloads, fp32), by kind. A ring
    all-reduce of P bytes over G ranks sends and receives 2 (G - 1) / G x P per rank."""
    block, shared = split_parameters(model)
    nbytes = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731
    k, d, w = layout.block_ranks, layout.data_ranks, layout.world_size
    extras = 4 * (1 + layout.num_blocks)
    out = {"block_grads": 0, "shared_grads": 0, "batch_norm": 0}
    if k == 1:
        out["shared_grads"] = (nbytes(block) + nbytes(shared) + extras) if w > 1 else 0
    else:
        out["block_grads"] = nbytes(block) if d > 1 else 0
        out["shared_grads"] = nbytes(shared) + extras
    if d > 1:  # BatchNorm per layer: sums + count, centred squares; forward and backward
        layers = [m for m in model.modules() if isinstance(m, BlockBatchNorm)]
        channels = sum(m.weight.numel() for m in layers)
        out["batch_norm"] = 2 * 4 * (2 * channels + len(layers))
    out["total"] = sum(out.values())
    ring = lambda payload, g: 2 * (g - 1) / g * payload if g > 1 else 0.0  # noqa: E731
    out["wire"] = (ring(out["block_grads"], d) + ring(out["shared_grads"], w)
                   + ring(out["batch_norm"], d))
    return out


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def describe_volume(volume: dict, layout: Layout) -> str:
    """The line rank 0 prints at start."""
    return (f"parallel: {layout.world_size} processes = {layout.block_ranks} block ranks x "
            f"{layout.data_ranks} data ranks, blocks {list(layout.spans)}; all-reduce payload per "
            f"step and rank {human_bytes(volume['total'])} (block grads "
            f"{human_bytes(volume['block_grads'])} over the data ranks, shared grads + loss "
            f"{human_bytes(volume['shared_grads'])} over all, BatchNorm statistics "
            f"{human_bytes(volume['batch_norm'])}), ring all-reduce sends about "
            f"{human_bytes(volume['wire'])} per rank")


def same_on_every_rank(value):
    """Rank 0's `value` (a picklable object), on every rank."""
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@contextmanager
def rank_zero_first(layout: Layout | None):
    """Rank 0 runs the body (e.g. builds a data cache) before the others start it."""
    if layout is not None and layout.rank != 0:
        dist.barrier()
    yield
    if layout is not None and layout.rank == 0:
        dist.barrier()
