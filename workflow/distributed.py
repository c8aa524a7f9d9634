"""Multi-process fine-tuning under `torchrun` or `accelerate launch` (`finetune.launcher`), with PyTorch's FSDP2.

The launcher starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT;
`init_from_env` joins the process group (nccl on CUDA, gloo on the CPU). `shard` applies `fully_shard` to every
decoder layer and then to the whole model, so each process holds 1/WORLD_SIZE of every parameter (a method's
extra parameters outside the layers, such as CLEX's ODE on the rotary module, are sharded with the root) and
gradients are averaged across processes by FSDP's reduce-scatter. `rank_rows` gives each process a disjoint,
equal share of a step's rows: the processes together see exactly the global batch one process would have seen.
With one process (no WORLD_SIZE, or 1) none of this runs.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether this process is one of several joined in a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes logs, checkpoints and the final model."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group described by the launcher's environment; False (and nothing done) for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))   # runtime.device() is then this GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(model):
    """FSDP2: `fully_shard` each decoder layer (its parameters are gathered only for its own forward and
    backward), then the root for the rest (embeddings, final norm, output layer, a method's rotary parameters)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def rank_rows(batch):
    """This process's contiguous share of a step's rows [rows, T] (of every tensor of a batch dict); the rows must
    split evenly."""
    if isinstance(batch, dict):
        return {key: rank_rows(value) for key, value in batch.items()}
    n, size = batch.shape[0], world_size()
    if n % size:
        raise ValueError(f"a step has {n} rows (finetune.tokens_per_step / train_len), which do not split evenly "
                         f"among {size} processes; choose tokens_per_step so that they do")
    share = n // size
    return batch[rank() * share:(rank() + 1) * share]


def mean_across(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the processes (every process gets it)."""
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)   # gloo has no AVG
    return value / world_size()


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full (unsharded) tensors gathered on the CPU of rank 0; the other ranks get an empty dict
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model) -> dict:
    """The whole model's state dict on rank 0 (empty elsewhere), a tied parameter under its first name only (as
    `save_pretrained` writes it); every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    aliases = ({name for name, _ in model.named_parameters(remove_duplicate=False)}
               - {name for name, _ in model.named_parameters()})
    return {name: value for name, value in state.items() if name not in aliases}


def full_state(model, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on rank 0, keyed by parameter name, so that a run with any number
    of processes can load them; every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_options())


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load full state dicts (as written by `full_state`) into a sharded model and its optimizer: each process
    keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))
