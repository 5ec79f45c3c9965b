"""Offline compile report of the scan kernels for an H100 (sm_90), no GPU needed: registers, spills, shared memory
and the SASS instructions of every loop, under the Triton that is imported (point PYTHONPATH at another Triton's
install to compare versions: the GPU machine has 3.6, torch 2.14.1 brings 3.8).

The launchers of kernels/scan_triton.py run as usual on CPU tensors shaped like a Vim layer's, except that every
kernel launch is replaced by a compile for sm_90, so each kernel is compiled with the arguments, strides and
constexprs a real call gives it (FAST paths included). Nothing is executed on a GPU, so nothing is timed: a
register count or a loop's instruction count is a reason to time a setting on the GPU, not a result
(`bench/sweep_scan_bwd.py` times them). `bench/NOTES_scan.md` has what earlier reports showed.

    python bench/compile_report.py [--shape 2,384,197] [--settings shipped 16,2,0,1,16 PF=0,WAVES=2 ...]
    (settings as in sweep_scan_bwd.py: "shipped", CK,SEG,MAXNREG[,WARPS[,BLOCK_E]] or named knobs)
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from bench.sweep_scan_bwd import SHOWN, scan_setting  # noqa: E402
from kernels import scan_triton  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class CompileInsteadOfLaunch:
    """Within the block, a kernel launch compiles the kernel for TARGET and records it instead of running it."""

    def __init__(self):
        self.compiled = []
        self.backend = make_backend(TARGET)

    def __enter__(self):
        self.launch, self.launch_opts = JITFunction.run, scan_triton._launch_opts
        report = self

        def compile_only(kernel, *args, grid, warmup, **kwargs):
            if "FAST" in kernel.arg_names:
                kwargs["FAST"] = True  # the GPU code path (hardware exp2 / lg2, conversions that round)
            binder = create_function_from_signature(kernel.signature, kernel.params, report.backend)
            bound_args, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(report.backend, kwargs, bound_args,
                                                                      specialization, options)
            compiled = triton_compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                                      options=options.__dict__)
            report.compiled.append((kernel.__name__, compiled))
            return compiled

        JITFunction.run = compile_only
        scan_triton._launch_opts = lambda t, maxnreg: {"maxnreg": maxnreg} if maxnreg else {}  # CPU tensors too
        return self

    def __exit__(self, *exc):
        JITFunction.run, scan_triton._launch_opts = self.launch, self.launch_opts
        return False


def sass_report(compiled):
    """(resource usage line, instruction count, {mnemonic: count}, [(loop start, loop end, instructions)])."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "--dump-sass", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", usage)
    code = [(int(a, 16), text.strip()) for a, text in re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass, re.M)]
    mnemonics = [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0] for _, text in code]
    loops = []  # a branch to an earlier address closes a loop body
    for address, text in code:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target[1], 16) < address:
            start = int(target[1], 16)
            loops.append((start, address, sum(start <= a <= address for a, _ in code)))
    return found[0] if found else usage.strip()[:120], len(code), Counter(mnemonics), loops


def make_call_inputs(batch, E, L, N=16):
    """Token-major bf16 activations and fp32 parameters, as the model hands them over (values do not matter)."""
    def token_major(*shape):
        return torch.zeros(*shape[:-2], shape[-1], shape[-2], dtype=torch.bfloat16).transpose(-1, -2)
    u, delta = token_major(2, batch, E, L), token_major(2, batch, E, L)
    B, C = token_major(2, batch, N, L), token_major(2, batch, N, L)
    z, dout, ysum = (token_major(batch, E, L) for _ in range(3))
    A, D, bias = -torch.ones(2, E, N), torch.ones(2, E), torch.zeros(2, E)
    return (u, delta, A, B, C, D, z, bias), dout, ysum


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="2,384,197", help="batch,E,L of the call (Vim-T at 224: the batch does not "
                                                        "change the code)")
    p.add_argument("--settings", nargs="+", default=["shipped"])
    a = p.parse_args()
    batch, E, L = (int(v) for v in a.shape.split(","))
    xs, dout, ysum = make_call_inputs(batch, E, L)
    print(f"triton {triton.__version__}, sm_90, call shape (batch, E, L) = ({batch}, {E}, {L}), bf16 token-major")
    for setting in a.settings:
        with scan_setting(setting) as values, CompileInsteadOfLaunch() as report:
            _, _, hin = scan_triton._scan_fwd(*xs, save=True, save_states=True)  # the training forward
            chunk, _ = scan_triton._chunking(batch, E, L, None, xs[0].device)
            scan_triton._scan_bwd(dout, *xs, ysum, hin, chunk, saved_ck=scan_triton._saves_checkpoints(True, True))
        print(f"\nsetting {setting}: " + ", ".join(f"{k} {v}" for k, v in zip(SHOWN, values)))
        for name, compiled in report.compiled:
            usage, count, mnemonics, loops = sass_report(compiled)
            print(f"  {name}: {usage}, {count} SASS instructions; "
                  + ", ".join(f"{m} {n}" for m, n in mnemonics.most_common(8)))
            for start, end, n in loops:
                print(f"    loop {start:#06x}-{end:#06x}: {n} instructions")


if __name__ == "__main__":
    main()
