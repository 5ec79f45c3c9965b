"""Process-group setup under the `deepspeed` launcher, torchrun, or plain `python` (one process)."""
import gc
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(local_rank=None):
    """Join (or create) the process group and pick this rank's device.

    Without a launcher the run is a single process: the rendezvous variables are set here so that
    DeepSpeed can initialise its group. NCCL on CUDA, gloo on CPU.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank or 0),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank or 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """This process's RNG states (python, numpy, torch CPU and CUDA)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(values, device):
    """Sum a list of floats over ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def shutdown_distributed():
    """Leave the process group before exit, so that no rank's NCCL watchdog outlives rank 0's store."""
    if torch.distributed.is_initialized():
        gc.collect()  # communication handles that only cycles still hold go now, not during interpreter teardown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
