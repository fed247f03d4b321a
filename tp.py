"""Tensor parallelism: generate.py under torchrun splits every layer's attention heads and FFN width across ranks.

    torchrun --standalone --nproc_per_node=3 generate.py --compile --temperature 0

NCCL on CUDA, gloo on CPU. Per layer: wq/wk/wv and w1/w3 are column-parallel (each rank keeps its slice of output
rows: its heads, its KV heads, its slice of the FFN width), wo and w2 are row-parallel (the matching input columns),
and their partial outputs are summed with one all-reduce each. Everything else is replicated: embeddings, norms,
the LM head, FlexiDepth routers and adapters. Replicating the head costs its bytes on every rank, but the hidden
state after each all-reduce and therefore the logits are the same on every rank with no gather, so every rank makes
the same sampling, acceptance and routing decision without any further communication.
"""
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from model import INT4_ROW_MULTIPLE

# Bounds the rendezvous and every collective, so a missing peer ends in an error instead of a hang. It must cover
# the difference in compile time between ranks, since the first collective of a compiled step waits for the slowest.
TIMEOUT_S = float(os.environ.get("FLEXFAST_DIST_TIMEOUT", "300"))

_ready_checked = False


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ or "WORLD_SIZE" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def maybe_init_dist(device: str) -> int:
    """Join the process group when launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in
    the environment); returns the world size, 1 when not launched that way."""
    if not launched_by_torchrun():
        return 1
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"incomplete torchrun environment: {', '.join(missing)} not set")
    try:
        rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank_))
        int(os.environ["MASTER_PORT"])
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers")
    if world == 1:
        return 1
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    try:
        with _c10d_log_held_back():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank_, world_size=world,
                                    timeout=timedelta(seconds=TIMEOUT_S))
    except Exception as e:  # DistNetworkError, DistStoreError, timeouts: all mean the same thing to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"rank {rank_} of {world} could not join the process group at "
                         f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {TIMEOUT_S:g}s: {first}")
    return world


@contextmanager
def _c10d_log_held_back():
    """The c10d store logs every connection retry, with a C++ stack trace, straight to file descriptor 2. Hold
    that back while joining: replay it when the join works, drop it when it fails (the error says what failed)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))


# ---------------------------------------------------------------- errors and agreement across ranks

def _exchange_errors(message: Optional[str]) -> Optional[str]:
    """One all-gather of every rank's setup error (None when fine); returns the lowest failing rank's message."""
    global _ready_checked
    _ready_checked = True
    messages = [None] * world_size()
    dist.all_gather_object(messages, message)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return None
    r, m = failed[0]
    return m if r == 0 else f"(rank {r}) {m}"


def check_all_ranks_ready():
    """Every rank calls this once, after loading and sharding. A rank that failed before this point joins the same
    exchange from exit_with_error, so the healthy ranks learn of it here and all stop together."""
    message = _exchange_errors(None)
    if message is not None:
        raise ValueError(message)


def exit_with_error(error: Exception):
    """Rank 0 prints one line, every rank exits non-zero, nobody waits forever."""
    message = str(error)
    if dist.is_initialized():
        if not _ready_checked:
            message = _exchange_errors(message) or message
        if rank() == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
        try:
            dist.barrier()  # nobody exits before rank 0 has printed (torchrun stops the rest when one exits)
            dist.destroy_process_group()
        except Exception:
            pass
        sys.exit(1)
    if int(os.environ.get("RANK", "0")) == 0:
        sys.exit(f"error: {message}")
    sys.exit(1)


def broadcast_seed(seed: int) -> int:
    """Rank 0's seed on every rank: sampling with temperature > 0 must draw the same tokens everywhere."""
    t = torch.tensor([seed % 2**63], dtype=torch.long,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())


# ---------------------------------------------------------------- sharding

COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


def check_shardable(model, world: int):
    """Refuse, before touching any weight, a split that would not be exact."""
    args = model.args
    ok = math.gcd(math.gcd(args.n_heads, args.n_kv_heads), args.intermediate_size)
    if ok % world:
        choices = [n for n in range(1, ok + 1) if ok % n == 0]
        raise ValueError(f"tensor parallelism over {world} processes needs {world} to divide the model's "
                         f"{args.n_heads} attention heads, {args.n_kv_heads} KV heads and FFN width "
                         f"{args.intermediate_size}; use --nproc_per_node in {choices}")
    layer = model.layers[0]
    for name in COLUMN_PARALLEL + ROW_PARALLEL:
        linear = layer.get_submodule(name)
        if not hasattr(linear, "groupsize"):  # only quantize.Int4Linear is grouped; plain and int8 split anywhere
            continue
        if linear.packed_for is not None:
            raise RuntimeError("shard int4 weights before pack_for_device: the packed layout cannot be split")
        if name in ROW_PARALLEL and (linear.in_features // linear.groupsize) % world:
            raise ValueError(f"int4 groupsize {linear.groupsize} does not fit tensor parallelism over {world}: "
                             f"{name}'s {linear.in_features} inputs split into {linear.in_features // world} "
                             f"per rank, which is not a whole number of groups; use a smaller groupsize")
        if name in COLUMN_PARALLEL and (linear.out_features // world) % INT4_ROW_MULTIPLE:
            raise ValueError(f"int4 needs each rank's share of {name}'s outputs ({linear.out_features // world}) "
                             f"to be a multiple of {INT4_ROW_MULTIPLE}")


def _replace_params(module, split):
    for name, p in list(module.named_parameters(recurse=False)):
        # clone: keep only this rank's slice in memory, not the whole mmap'd tensor
        setattr(module, name, nn.Parameter(split(p).clone(), requires_grad=False))


def shard_column_parallel(linear: nn.Module, rank_: int, world: int):
    """Keep this rank's slice of output rows. Every parameter of a linear, plain or quantized (int8 and int4
    weights, scales, zeros), has the output rows on dim 0."""
    _replace_params(linear, lambda p: p.tensor_split(world, dim=0)[rank_])
    linear.out_features //= world


def shard_row_parallel(linear: nn.Module, rank_: int, world: int):
    """Keep this rank's slice of input columns and sum the partial products with an all-reduce after it. The 2-D
    parameters follow the inputs on dim 1 (weight columns, int4 nibble pairs, int4 groups); 1-D per-output
    scales (int8) apply to every rank's partial sum alike and stay whole."""
    _replace_params(linear, lambda p: p.tensor_split(world, dim=1)[rank_] if p.dim() == 2 else p)
    linear.in_features //= world
    linear.register_forward_hook(_all_reduce_output)


def _all_reduce_output(module, inputs, output):
    # functional collective: traceable by torch.compile (fullgraph); gloo and NCCL give every rank the same bits
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def apply_tp(model):
    """Shard a loaded model in place for this rank: before int4 packing, before moving to the device, before
    setup_caches. Attention.n_heads / n_kv_heads become this rank's counts, so the KV cache (setup_caches reads
    them) holds only this rank's KV heads. Embeddings, norms, LM head, routers and adapters stay whole."""
    rank_, world = rank(), world_size()
    check_shardable(model, world)
    for layer in model.layers:
        for name in COLUMN_PARALLEL:
            shard_column_parallel(layer.get_submodule(name), rank_, world)
        for name in ROW_PARALLEL:
            shard_row_parallel(layer.get_submodule(name), rank_, world)
        layer.attention.n_heads //= world
        layer.attention.n_kv_heads //= world
    return model


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
