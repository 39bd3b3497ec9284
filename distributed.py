"""Multi-device training under torchrun (DESIGN §5; usage in docs/DISTRIBUTED.md).

    torchrun --standalone --nproc_per_node=8 train.py configs/hope_760m.yaml

train.py calls, in this order:

    env = setup(cfg)                       # process group (nccl on CUDA, gloo on CPU), device
    model = build_model(...).to(env.device)
    train_model = parallelize(model, cfg, env)   # AC -> compile -> FSDP2 / DDP, each block separately
    ...                                          # the optimiser is built on `model` after this: FSDP2
                                                 # shards its parameters in place
    teardown(env, clean=True)

Every architecture is sharded the same way: `fully_shard` on each `Block` in
`model.blocks` and on the root, which holds the embedding and the LM head (one group, so a
tied embedding/head weight is gathered once). Titans/HOPE/CMS fast weights are not
parameters but per-sequence activations computed inside a block's forward, so every
in-context memory update keeps running under FSDP2 and DDP exactly as in one process.
"""
from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import warnings

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from config import Config, ConfigError

# A block returns its streaming state (KV cache slices, fast weights); FSDP2 warns that these
# are views because an in-place op on them would skip its hooks. Training discards the state
# and nothing modifies it in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"              # "cpu" or "cuda:<local_rank>"
    device_type: str = "cpu"
    data_parallel: str = "none"      # none | fsdp | ddp
    owns_process_group: bool = False  # True when setup() created it (teardown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name, default):
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def setup(cfg: Config) -> DistEnv:
    """Pick the device and, under torchrun (or with distributed.data_parallel=fsdp), join the process group."""
    t, d = cfg.train, cfg.distributed
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = _env_int("RANK", 0) if under_torchrun else 0
    world_size = _env_int("WORLD_SIZE", 1) if under_torchrun else 1
    local_rank = _env_int("LOCAL_RANK", 0) if under_torchrun else 0
    if not (world_size >= 1 and 0 <= rank < world_size and local_rank >= 0):   # else a ZeroDivisionError or
        # a rendezvous that waits for ranks that never come
        raise ConfigError(f"environment variables RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world_size} "
                          "need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0 (torchrun sets them)")

    if t.batch_size % (world_size * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} is the global batch: it must be divisible by "
                          f"{world_size} ranks x train.grad_accum={t.grad_accum}")
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if t.device == "auto" else t.device
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                              "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
    device = f"cuda:{local_rank}" if device_type == "cuda" else "cpu"

    if d.data_parallel == "fsdp" or (d.data_parallel == "auto" and world_size > 1):
        data_parallel = "fsdp"
    else:
        data_parallel = "ddp" if world_size > 1 else "none"

    env = DistEnv(rank, local_rank, world_size, device, device_type, data_parallel)
    if (under_torchrun or data_parallel == "fsdp") and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=d.timeout_s)
        if under_torchrun:
            dist.init_process_group(backend, timeout=timeout)
        else:   # FSDP2 on one device without torchrun: a 1-rank group needs no network rendezvous
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        env.owns_process_group = True
    return env


def teardown(env: DistEnv, clean: bool):
    """Leave the process group. On a clean exit every rank first meets at a barrier: without
    it gloo/FSDP2 jobs occasionally abort at exit (PLATFORM.md). After an error we skip the
    barrier (the other ranks may never reach it); torchrun stops them."""
    if env.owns_process_group and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def on_main(env: DistEnv, fn):
    """fn() on rank 0 alone (data preparation, the files of out_dir), the other ranks waiting
    -> its result on rank 0, None elsewhere. A one-line error of rank 0 (ConfigError, OSError,
    ValueError) is raised on every rank with the same message: a rank left waiting in a
    collective would die with a gloo/NCCL traceback printed above the real error."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except (ConfigError, OSError, ValueError) as e:
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0)       # also the barrier the other ranks wait at
        if message[0] is not None and error is None:
            error = ConfigError(message[0])
    if error is not None:
        raise error
    return result


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (SUM / world: gloo has no ReduceOp.AVG)."""
    return all_reduce_sum(value) / (dist.get_world_size() if dist.is_initialized() else 1)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_max(value: float, device) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = torch.tensor(value, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()
    return value


# ----------------------------------------------------------------------------------------
# parallelising a model: activation checkpointing -> compile -> FSDP2 or DDP (torchtitan order)

def apply_activation_checkpointing(model):
    """Recompute each block's activations during backward (full AC per block).

    The block's forward is wrapped in place rather than the block in a wrapper module, so
    parameter names, and therefore checkpoints, are the same with AC on or off."""
    for block in model.blocks:
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward):
    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpointed_forward


def apply_compile(model):
    """torch.compile each block's forward separately (after AC, so the compiler sees the
    checkpointed region): blocks share one structure, so compile time stays about that of
    one block, and the FSDP2 hooks around each block stay outside the compiled graph.
    Parameter names are unchanged. Only training forwards (grad enabled) run compiled: the
    streaming ones (sampling, evals) feed a new position every call, and the memories' chunk
    boundaries depend on it (pos % C), so the compiler would specialise again each time (51
    recompiles and 4 minutes for a 16-token sample before it gave up at its limit)."""
    for block in model.blocks:
        block.forward = _compiled_for_training(block.forward)


def _compiled_for_training(forward):
    compiled = torch.compile(forward)

    def forward_compiled_when_training(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else forward)(*args, **kwargs)
    return forward_compiled_when_training


def mixed_precision_dtype(cfg: Config, env: DistEnv):
    """FSDP2 parameter dtype: distributed.mixed_precision, where auto follows train.dtype."""
    choice = cfg.distributed.mixed_precision
    if choice == "auto":
        return torch.bfloat16 if cfg.train.computes_in_bf16(env.device_type) else torch.float32
    return torch.bfloat16 if choice == "bf16" else torch.float32


def apply_fsdp(model, cfg: Config, env: DistEnv):
    """FSDP2: fully_shard every block, then the root (embedding, final norm, head).

    Parameters are sharded on dim 0 across ranks and gathered per block just in time;
    MixedPrecisionPolicy gathers them in `mixed_precision_dtype` (by default bf16 when the
    run computes in bf16, as on CUDA; fp32 on CPU/gloo, where bf16 matmuls are slow) and
    always reduce-scatters gradients in fp32. The last block is never
    resharded after forward: backward would gather it again at once (torchtitan).
    Forward inputs are not cast to the parameter dtype (cast_forward_inputs=False): they
    carry the streaming state, whose fast weights must stay fp32 (docs/FIDELITY.md); bf16
    parameters run under autocast instead (train.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device_type, (env.world_size,))
    param_dtype = mixed_precision_dtype(cfg, env)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    reshard = cfg.distributed.reshard_after_forward
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard and i < n - 1)
    # the root group holds embed, norm and head: a tied embed/head weight lives in one group
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    return model


def parallelize(model, cfg: Config, env: DistEnv):
    """Apply the configured speed features and data parallelism. Returns the module to train
    with (the FSDP2 model itself, or a DDP wrapper); `model` keeps its parameter names."""
    if not hasattr(model, "blocks"):
        raise ValueError(f"{type(model).__name__} has no .blocks: cannot shard it per block")
    if cfg.distributed.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model)
    if env.data_parallel == "fsdp":
        return apply_fsdp(model, cfg, env)
    if env.data_parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [env.local_rank] if env.device_type == "cuda" else None
        # Parameters that get no gradient (a CMS level's W_v at a chunk >= seq_len) must be
        # announced to DDP, or it stops at the next step; FSDP2 needs nothing of the kind.
        idle = bool(model.idle_parameters(cfg.train.seq_len))
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=idle)
    return model


def gradient_sync(train_model, env: DistEnv, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only on the
    last micro-batch of a step (no redundant all-reduce / reduce-scatter while accumulating)."""
    if env.data_parallel == "fsdp":
        train_model.set_requires_gradient_sync(sync)
        return nullcontext()
    if env.data_parallel == "ddp" and not sync:
        return train_model.no_sync()
    return nullcontext()


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. FSDP2's total grad norm, a partial sum over ranks) -> a plain tensor."""
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
