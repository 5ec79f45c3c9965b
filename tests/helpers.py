"""Shared pieces of the training tests: tiny configs and a launcher for several gloo ranks."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = ["model.img_size=32", "model.patch_size=8", "model.stride=8", "model.embed_dim=32", "model.depth=2",
              "data.input_size=32", "data.num_workers=0", "data.batch_size=16", "train.log_every=1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script_args, world_size, timeout=600, env=None):
    """Run `python script_args...` as world_size gloo ranks from the repo root; returns their outputs."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        penv = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                    **(env or {}))
        procs.append(subprocess.Popen([sys.executable, *script_args], cwd=ROOT, env=penv,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
    return outputs


def read_losses(output_dir):
    """{step: loss} of the training lines of metrics.jsonl."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def interpreted_kernel_modules(*names):
    """The kernel modules `names` with their Triton kernels built by Triton's interpreter; modules imported earlier
    without it (by another test module) are reloaded, in the order given (dependencies first). Skips the calling
    test module when the interpreter is not active. Call at import time, after TRITON_INTERPRET=1 is set."""
    import importlib

    import pytest

    def interpreted(module):
        kinds = {type(v).__name__ for v in vars(module).values()}
        return "InterpretedFunction" in kinds and "JITFunction" not in kinds

    modules = [importlib.import_module(name) for name in names]
    if not all(map(interpreted, modules)):
        modules = [importlib.reload(m) for m in modules]
    if not all(map(interpreted, modules)):
        pytest.skip("Triton interpreter not active; the Triton kernel tests need TRITON_INTERPRET=1",
                    allow_module_level=True)
    return modules


class OutOfBounds(AssertionError):
    pass


class interpreter_bounds_check:
    """Context manager: under Triton's interpreter, every load and store a kernel makes on an unmasked lane must
    address one of the tensors passed to that kernel; the first that does not raises OutOfBounds naming the kernel.
    A GPU faults on such an access (or reads garbage) where the interpreter reads whatever memory lies there, so
    this catches on the CPU what would otherwise first show as an illegal memory access on the device."""

    def __enter__(self):
        import numpy as np
        import torch
        from triton.runtime import interpreter

        self.patched = [(interpreter.GridExecutor, "_init_args_hst"),
                        (interpreter.InterpreterBuilder, "create_masked_load"),
                        (interpreter.InterpreterBuilder, "create_masked_store")]
        self.saved = [getattr(cls, name) for cls, name in self.patched]
        init_args, masked_load, masked_store = self.saved
        state = {"kernel": None, "ranges": []}

        def init_args_checked(executor, args_dev, kwargs):
            args_hst, kwargs_hst = init_args(executor, args_dev, kwargs)
            storages = [a.untyped_storage() for a in (*args_hst, *kwargs_hst.values()) if isinstance(a, torch.Tensor)]
            state["ranges"] = [(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages]
            state["kernel"] = getattr(executor.fn, "__name__", str(executor.fn))
            return args_hst, kwargs_hst

        def check(builder, ptrs, mask, kind):
            active = mask.data.astype(bool)  # masks come as bool or as 0/1 integers
            addresses = np.broadcast_to(ptrs.data, active.shape)[active].astype(np.uint64)
            inside = np.zeros(addresses.shape, dtype=bool)
            for low, high in state["ranges"]:
                inside |= (addresses >= low) & (addresses < high)
            if not inside.all():
                raise OutOfBounds(f"{state['kernel']}: {kind} outside its tensors on {int((~inside).sum())} lanes "
                                  f"of program {tuple(builder.grid_idx)}")

        def load_checked(builder, ptrs, mask, other, *args):
            check(builder, ptrs, mask, "load")
            return masked_load(builder, ptrs, mask, other, *args)

        def store_checked(builder, ptrs, value, mask, *args):
            check(builder, ptrs, mask, "store")
            return masked_store(builder, ptrs, value, mask, *args)

        for (cls, name), fn in zip(self.patched, (init_args_checked, load_checked, store_checked)):
            setattr(cls, name, fn)
        return self

    def __exit__(self, *exc):
        for (cls, name), fn in zip(self.patched, self.saved):
            setattr(cls, name, fn)
        return False
