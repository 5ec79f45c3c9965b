"""GPU check and benchmark of the fused bidirectional depthwise conv1d + SiLU (kernels/conv_triton.py).

At the model's shapes (bf16 x = the first half of a (batch, L, 2E) tensor, as in_proj hands it over; fp32 weight and
bias, K = 4; fresh random data each run):
  1. fwd + bwd with every floating torch.empty / empty_like filled with NaN (u, dx and the dweight / dbias partials come
     from torch.empty, so an element the kernel fails to write shows up as NaN): all results must be finite;
  2. the same again: results must be bitwise equal (determinism);
  3. u, dx, dweight, dbias against the float64 reference on the same inputs: the kernel's relative error must be at
     most 2x that of the reference run on the same bf16 inputs (fp32 arithmetic), plus 1e-3 (STYLE.md 9);
  4. fp32 x on one smaller shape, relative error < 1e-5.
Then CUDA-event medians (triton.testing.do_bench) of fwd and fwd+bwd (gradients of x, weight, bias) for the kernel and
for today's PyTorch path (nn.Conv1d-style F.conv1d on x.transpose(1, 2), the flipped-weight F.conv1d on the right-padded
input, SiLU, torch.stack to (2, batch, E, L)), both under bf16 autocast as in training. Floor: bytes (fwd reads x and
writes u: 3 BLE bf16 values; bwd reads x and du and writes dx: 4 BLE) over the device-to-device copy bandwidth measured
in the same run. Last, a few settings of the module's tiling knobs are timed at two shapes; each must reproduce the
defaults' u and dx bitwise. Logs go to $OUT when set.

    python bench/gpu_check_conv.py [--skip-variants]

Exit status 1 if any check fails (the lines start with FAIL).
"""
import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from bench_scan import copy_bandwidth  # noqa: E402
from gpu_check_scan import poisoned_empty  # noqa: E402
from kernels import conv_triton as ct  # noqa: E402
from kernels.conv_ref import bidirectional_conv1d_silu_ref  # noqa: E402

SHAPES = [  # batch, L, E, what
    (128, 197, 384, "Vim-T 224"),
    (64, 197, 768, "Vim-S 224"),
    (8, 6085, 384, "Vim-T 1248"),
    (512, 65, 384, "CIFAR Vim-T 32px/patch 4"),
]
K = 4
NAMES = ("u", "dx", "dweight", "dbias")
KNOBS = ("_FWD_BLOCK_T", "_FWD_BLOCK_E", "_FWD_WARPS", "_BWD_BLOCK_T", "_BWD_BLOCK_E", "_BWD_WARPS",
         "_BWD_PROGRAMS_PER_SM")
VARIANTS = [
    {},                                              # the module's defaults
    {"_FWD_BLOCK_T": 16},
    {"_FWD_BLOCK_E": 64, "_FWD_WARPS": 1},
    {"_BWD_BLOCK_T": 8},
    {"_BWD_BLOCK_E": 64, "_BWD_WARPS": 2},
    {"_BWD_PROGRAMS_PER_SM": 16},
]
VARIANT_SHAPES = (0, 2)
TIME_BUDGET_S = 80  # variants stop being timed past this, so the whole run stays near 90 s
OUT = os.environ.get("OUT")
FAILS = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    if OUT:  # written as we go, so a run cut off at its time limit still leaves its log
        with open(os.path.join(OUT, "gpu_check_conv.log"), "a") as f:
            f.write(s + "\n")


def fail(msg):
    FAILS.append(msg)
    log("FAIL: " + msg)


def make_inputs(batch, L, E, dtype=torch.bfloat16, seed=None):
    """x: (batch, L, E) view of a (batch, L, 2E) tensor; weight (2, E, K), bias (2, E) fp32 with nn.Conv1d's init
    scale (uniform in +-1/sqrt(K)); du (2, batch, L, E)."""
    g = torch.Generator(device="cuda").manual_seed(int(time.time_ns()) % 2 ** 31 if seed is None else seed)
    base = torch.randn(batch, L, 2 * E, device="cuda", generator=g).to(dtype)
    bound = K ** -0.5
    weight = (torch.rand(2, E, K, device="cuda", generator=g) * 2 - 1) * bound
    bias = (torch.rand(2, E, device="cuda", generator=g) * 2 - 1) * bound
    du = torch.randn(2, batch, L, E, device="cuda", generator=g).to(dtype)
    return base[..., :E], weight, bias, du


def fwd_bwd(fn, x, weight, bias, du):
    """u and the gradients of x (the view itself, not its base), weight and bias."""
    x, weight, bias = x.detach().requires_grad_(), weight.detach().requires_grad_(), bias.detach().requires_grad_()
    u = fn(x, weight, bias)
    return [u.detach(), *torch.autograd.grad(u, (x, weight, bias), du.to(u.dtype))]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_shape(batch, L, E, what):
    x, weight, bias, du = make_inputs(batch, L, E)
    with poisoned_empty():
        first = fwd_bwd(ct.bidirectional_conv1d_silu_triton, x, weight, bias, du)
        second = fwd_bwd(ct.bidirectional_conv1d_silu_triton, x, weight, bias, du)
    torch.cuda.synchronize()
    res = dict(shape=(batch, L, E), what=what)
    res["finite"] = all(bool(torch.isfinite(t).all()) for t in first)
    res["deterministic"] = all(torch.equal(a, b) for a, b in zip(first, second))
    res["layout"] = first[0].shape == (2, batch, L, E) and first[0].is_contiguous() and first[0].dtype == x.dtype
    ref = fwd_bwd(bidirectional_conv1d_silu_ref, x.double(), weight.double(), bias.double(), du.double())
    low = fwd_bwd(bidirectional_conv1d_silu_ref, x, weight, bias, du)
    res["err"] = {n: rel(g, r) for n, g, r in zip(NAMES, first, ref)}
    res["err_ref_bf16"] = {n: rel(lo, r) for n, lo, r in zip(NAMES, low, ref)}
    res["u_equal_to_ref_bf16"] = (first[0] == low[0]).double().mean().item()   # information: rounding matches torch's
    res["ok"] = res["finite"] and res["deterministic"] and res["layout"] and all(
        res["err"][n] <= 2 * res["err_ref_bf16"][n] + 1e-3 for n in NAMES)
    del first, second, ref, low
    torch.cuda.empty_cache()
    return res


def check_fp32():
    batch, L, E = 4, 300, 384
    x, weight, bias, du = make_inputs(batch, L, E, dtype=torch.float32)
    got = fwd_bwd(ct.bidirectional_conv1d_silu_triton, x, weight, bias, du)
    ref = fwd_bwd(bidirectional_conv1d_silu_ref, x.double(), weight.double(), bias.double(), du.double())
    err = {n: rel(g, r) for n, g, r in zip(NAMES, got, ref)}
    return dict(shape=(batch, L, E), what="fp32 x", err=err, ok=all(v < 1e-5 for v in err.values()))


def torch_path(x, w0, b0, w1, b1):
    """Today's model code: nn.Conv1d(E, E, K, groups=E, padding=K-1) on the channel-major view, [..., :L]; the
    backward direction's flipped weight on the right-padded input; SiLU; stacked to (2, batch, E, L)."""
    L, E = x.shape[1], x.shape[2]
    xt = x.transpose(1, 2)
    u0 = F.conv1d(xt, w0, b0, padding=K - 1, groups=E)[..., :L]
    u1 = F.conv1d(F.pad(xt, (0, K - 1)), w1.flip(-1), b1, groups=E)
    return torch.stack([F.silu(u0), F.silu(u1)])


def time_pair(fwd, inputs, du):
    """(fwd ms, fwd+bwd ms), medians of CUDA-event timings, under bf16 autocast as in training."""
    def f():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fwd(*inputs)

    def fb():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            u = fwd(*inputs)
        return torch.autograd.grad(u, inputs, du)

    return (do_bench(f, warmup=25, rep=100, return_mode="median"),
            do_bench(fb, warmup=25, rep=100, return_mode="median"))


def time_shape(batch, L, E):
    x, weight, bias, du = make_inputs(batch, L, E, seed=0)
    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    t_tri = time_pair(ct.bidirectional_conv1d_silu_triton, (x, weight, bias), du)
    # the model's parameters: one (E, 1, K) weight and (E,) bias per direction
    w0, w1 = (weight[d].detach().unsqueeze(1).clone().requires_grad_() for d in range(2))
    b0, b1 = (bias[d].detach().clone().requires_grad_() for d in range(2))
    du_cm = du.transpose(-1, -2).contiguous()      # (2, batch, E, L), the torch path's output layout
    t_torch = time_pair(torch_path, (x, w0, b0, w1, b1), du_cm)
    return t_tri, t_torch


def time_variants(deadline):
    base = {k: getattr(ct, k) for k in KNOBS}
    rows = []
    for i in VARIANT_SHAPES:
        batch, L, E, what = SHAPES[i]
        x, weight, bias, du = make_inputs(batch, L, E, seed=1)
        expected = None
        for v in VARIANTS:
            if time.time() > deadline:
                log(f"variants: time budget reached, {v} at {what} and later ones not timed")
                break
            for k in KNOBS:
                setattr(ct, k, v.get(k, base[k]))
            try:
                got = fwd_bwd(ct.bidirectional_conv1d_silu_triton, x, weight, bias, du)
                if expected is None:
                    expected = got
                elif not (torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
                          and all(rel(a, b) < 1e-5 for a, b in zip(got[2:], expected[2:]))):
                    fail(f"variant {v} at {what}: results differ from the defaults'")
                xs = (x.detach().requires_grad_(), weight.detach().requires_grad_(), bias.detach().requires_grad_())
                t_f, t_fb = time_pair(ct.bidirectional_conv1d_silu_triton, xs, du)
                rows.append(dict(variant=v, shape=(batch, L, E), fwd=t_f, fwdbwd=t_fb))
                log(f"variant {v or 'default'} at {what}: fwd {t_f * 1e3:.1f} us, fwd+bwd {t_fb * 1e3:.1f} us")
            except Exception:  # noqa: BLE001 - a knob setting that does not compile is reported, not fatal
                fail(f"variant {v} at {what} raised:\n{traceback.format_exc()}")
        for k in KNOBS:
            setattr(ct, k, base[k])
        del x, weight, bias, du, expected
        torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-variants", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        log("FAIL: no CUDA device")
        return 1
    start = time.time()
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    header = (f"{props.name}, {props.multi_processor_count} SMs, copy bandwidth {bw / 1e12:.2f} TB/s; torch "
              f"{torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
    log(header)

    checks = []
    for batch, L, E, what in SHAPES:
        try:
            r = check_shape(batch, L, E, what)
        except Exception:  # noqa: BLE001
            r = dict(shape=(batch, L, E), what=what, ok=False, error=traceback.format_exc())
        checks.append(r)
        log(json.dumps(r, default=str))
        if not r["ok"]:
            fail(f"check at {what} {(batch, L, E)}")
    try:
        r = check_fp32()
    except Exception:  # noqa: BLE001
        r = dict(what="fp32 x", ok=False, error=traceback.format_exc())
    checks.append(r)
    log(json.dumps(r, default=str))
    if not r["ok"]:
        fail("fp32 check")

    rows = []
    for batch, L, E, what in SHAPES:
        try:
            (tf, tfb), (pf, pfb) = time_shape(batch, L, E)
        except Exception:  # noqa: BLE001
            fail(f"timing at {what} raised:\n{traceback.format_exc()}")
            continue
        ble2 = batch * L * E * 2                      # bytes of one bf16 (batch, L, E) tensor
        floor_f, floor_fb = 3 * ble2 / bw * 1e3, 7 * ble2 / bw * 1e3
        rows.append(dict(shape=(batch, L, E), what=what, triton=(tf, tfb), torch=(pf, pfb), floor=(floor_f, floor_fb)))
        torch.cuda.empty_cache()

    variants = []
    if not a.skip_variants:
        variants = time_variants(start + TIME_BUDGET_S)

    log("")
    log(f"Bidirectional depthwise conv1d + SiLU, K = {K}, bf16 x (half of in_proj's output), fp32 params, "
        f"bf16 autocast; {header}")
    log("")
    log("| shape (batch, L, E) | what | Triton fwd / fwd+bwd us | PyTorch path fwd / fwd+bwd us | speed-up fwd / fwd+bwd "
        "| bytes floor fwd / fwd+bwd us | % of floor fwd / fwd+bwd |")
    log("|---|---|---|---|---|---|---|")
    for r in rows:
        (tf, tfb), (pf, pfb), (ff, ffb) = r["triton"], r["torch"], r["floor"]
        log(f"| {', '.join(map(str, r['shape']))} | {r['what']} | {tf * 1e3:.1f} / {tfb * 1e3:.1f} "
            f"| {pf * 1e3:.1f} / {pfb * 1e3:.1f} | {pf / tf:.1f}x / {pfb / tfb:.1f}x | {ff * 1e3:.1f} / {ffb * 1e3:.1f} "
            f"| {100 * ff / tf:.0f}% / {100 * ffb / tfb:.0f}% |")
    log("")
    log(f"CHECKS: {'ALL OK' if not FAILS else f'{len(FAILS)} FAILURES'}; {time.time() - start:.0f} s")
    if OUT:
        with open(os.path.join(OUT, "gpu_check_conv.json"), "w") as f:
            json.dump(dict(device=header, checks=checks, table=rows, variants=variants, fails=FAILS), f, indent=1,
                      default=str)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
