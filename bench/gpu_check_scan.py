"""GPU run for the Triton bidirectional scan: correctness at the real shapes, poisoned outputs, determinism, timing.

For every shape of issue 3 (bf16, token-major inputs, fresh random data):
  1. fwd + bwd at the full shape with every torch.empty poisoned with NaN (the kernel's outputs and scratch come from
     torch.empty, so an element it fails to write shows up as NaN); all results must be finite;
  2. the same again, results must be bitwise equal (determinism); and with save_states=False (the backward
     recomputing the states the forward keeps by default), results equal within 1e-5 of the largest value;
  3. a float64 reference on a row subset (and, where the reference would not fit, a channel subset too): per-row
     outputs and gradients are compared with the full-shape run; gradients summed over batch/channels (dA, dD,
     d delta_bias, and dB / dC for a channel subset) with a kernel run on the same subset;
  4. fp32 inputs on one small subset (tight tolerance).
Then a few settings of the module's tuning knobs (VARIANTS) are timed, and bench_scan's table is printed with the
module's defaults. Logs go to $OUT when set. `--profile i` only runs two fwd+bwd steps at shape i, for ncu:

    python bench/gpu_check_scan.py [--quick] [--skip-check] [--skip-variants]
    ncu -k regex:"_scan_(fwd|bwd)_kernel" --launch-skip 2 --launch-count 2 python bench/gpu_check_scan.py --profile 0
"""
import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_scan  # noqa: E402
from kernels import scan_triton as st  # noqa: E402
from kernels.scan_ref import bidirectional_scan_ref  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
OUT = os.environ.get("OUT")
DEVICE = "cuda"
LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)
    if OUT:  # written as we go, so a run cut off at its time limit still leaves its log
        with open(os.path.join(OUT, "gpu_check_scan.log"), "a") as f:
            f.write(s + "\n")


class poisoned_empty:
    """Every floating torch.empty / empty_like filled with NaN while active."""

    def __enter__(self):
        self.e, self.el = torch.empty, torch.empty_like

        def empty(*a, **k):
            t = self.e(*a, **k)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        def empty_like(*a, **k):
            t = self.el(*a, **k)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        torch.empty, torch.empty_like = empty, empty_like
        return self

    def __exit__(self, *exc):
        torch.empty, torch.empty_like = self.e, self.el
        return False


def fwd_bwd(fn, xs, g, **kw):
    xs = [x.detach().requires_grad_() for x in xs]
    out = fn(*xs, **kw)
    grads = torch.autograd.grad(out, xs, g.to(out.dtype))
    return out.detach(), list(grads)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sub_inputs(xs, rows, chans):
    u, delta, A, B, C, D, z, bias = xs
    cs = slice(None) if chans is None else slice(0, chans)
    return [u[:, rows, cs], delta[:, rows, cs], A[:, cs], B[:, rows], C[:, rows], D[:, cs], z[rows, cs], bias[:, cs]]


def check_shape(batch, E, L, rows, chans, tol_out=1e-2, tol_grad=2e-2):
    torch.manual_seed(batch * 7 + L)
    xs = [x.detach() for x in bench_scan.make_inputs(batch, E, L, seed=int(time.time()) % 1000, device=DEVICE)]
    g = bench_scan.token_major(torch.randn(batch, E, L, device=DEVICE).to(torch.bfloat16))
    res = dict(shape=(batch, E, L))
    with poisoned_empty():
        out1, gr1 = fwd_bwd(st.bidirectional_scan_triton, xs, g)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        out2, gr2 = fwd_bwd(st.bidirectional_scan_triton, xs, g)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        out3, gr3 = fwd_bwd(st.bidirectional_scan_triton, xs, g, save_states=False)
    res["finite"] = bool(torch.isfinite(out1).all()) and all(bool(torch.isfinite(t).all()) for t in gr1)
    res["deterministic"] = torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(gr1, gr2))
    res["recomputed_max_diff"] = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                                     .item() for a, b in zip((out1, *gr1), (out3, *gr3)))
    del out2, gr2, out3, gr3
    # float64 reference on a subset
    xs_sub = sub_inputs(xs, rows, chans)
    g_sub = g[rows] if chans is None else g[rows, :chans]
    ref_out, ref_gr = fwd_bwd(bidirectional_scan_ref, [x.double() for x in xs_sub], g_sub.double())
    k_out, k_gr = fwd_bwd(st.bidirectional_scan_triton, xs_sub, g_sub)
    errs = {}
    if chans is None:  # per-row tensors from the full-shape run
        errs["out"] = rel(out1[rows], ref_out)
        for i, name in enumerate(NAMES):
            if name in ("u", "delta"):
                errs["d" + name] = rel(gr1[i][:, rows], ref_gr[i])
            elif name in ("B", "C"):
                errs["d" + name] = rel(gr1[i][:, rows], ref_gr[i])
            elif name == "z":
                errs["dz"] = rel(gr1[i][rows], ref_gr[i])
            else:
                errs["d" + name] = rel(k_gr[i], ref_gr[i])
    else:
        errs["out"] = rel(k_out, ref_out)
        for i, name in enumerate(NAMES):
            errs["d" + name] = rel(k_gr[i], ref_gr[i])
    res["errors"] = errs
    res["ok"] = (res["finite"] and res["deterministic"] and res["recomputed_max_diff"] <= 1e-5
                 and errs["out"] < tol_out and all(v < tol_grad for k, v in errs.items() if k != "out"))
    del ref_out, ref_gr
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return res


def check_fp32():
    xs = [x.detach().float() if x.dtype == torch.bfloat16 else x.detach()
          for x in bench_scan.make_inputs(4, 384, 300, seed=3, device=DEVICE)]
    g = torch.randn(4, 384, 300, device=DEVICE)
    ref_out, ref_gr = fwd_bwd(bidirectional_scan_ref, [x.double() for x in xs], g.double())
    out, gr = fwd_bwd(st.bidirectional_scan_triton, xs, g, chunk_size=64)
    errs = {"out": rel(out, ref_out), **{"d" + n: rel(a, b) for n, a, b in zip(NAMES, gr, ref_gr)}}
    return dict(shape="fp32 (4, 384, 300), chunk 64", errors=errs, ok=all(v < 1e-4 for v in errs.values()))


KNOBS = ("_FWD_MAXNREG", "_BWD_MAXNREG", "_SEG", "_CK", "_TARGET_PROGRAMS", "_WAVES")
VARIANTS = [
    {},                                                   # the module's defaults
    {"_WAVES": 2},                                        # long sequences cut into twice as many chunks
]


def time_variants(quick):
    """Triton fwd / fwd+bwd ms for each knob setting of kernels.scan_triton (register caps, checkpoint interval,
    chunking target) at Vim-T 224, Vim-T 1248 and 16k tokens."""
    out = []
    shapes = [3, 4] if quick else [0, 3, 4]
    base = {k: getattr(st, k) for k in KNOBS}
    for v in VARIANTS:
        for k in KNOBS:
            setattr(st, k, v.get(k, base[k]))
        for i in shapes:
            batch, E, L = bench_scan.SHAPES[i][:3]
            xs = bench_scan.make_inputs(batch, E, L)
            g = bench_scan.token_major(torch.randn(batch, E, L, device="cuda").to(torch.bfloat16))
            try:
                t_f, t_fb = bench_scan.time_backend("triton", xs, g)
                out.append((v, (batch, E, L), t_f, t_fb))
                log(f"variant {v or 'default'} shape {(batch, E, L)}: fwd {t_f:.3f} ms, fwd+bwd {t_fb:.3f} ms")
            except Exception:  # noqa: BLE001
                log(f"variant {v} shape {(batch, E, L)} failed:\n{traceback.format_exc()}")
            del xs, g
            torch.cuda.empty_cache()
    for k in KNOBS:
        setattr(st, k, base[k])
    return out


def profile_step(shape_index):
    """Two fwd+bwd steps at one shape (the first compiles); run under ncu with --launch-skip to see the second."""
    batch, E, L = bench_scan.SHAPES[shape_index][:3]
    xs = bench_scan.make_inputs(batch, E, L)
    g = bench_scan.token_major(torch.randn(batch, E, L, device="cuda").to(torch.bfloat16))
    for _ in range(2):
        out = st.bidirectional_scan_triton(*xs)
        torch.autograd.grad(out, xs, g)
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--profile", type=int, default=None, help="only run profile_step(shape index)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--skip-variants", action="store_true")
    a = p.parse_args()
    if a.profile is not None:
        return profile_step(a.profile)
    import triton
    log(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name(0)}")
    results = []
    variants = []
    if not a.skip_check:
        # (shape, row subset, channel subset for the reference where the full-E float64 graph would be too big)
        plan = [((128, 384, 197), [0, 127], None), ((64, 768, 197), [0, 63], None), ((32, 1536, 197), [5, 31], None),
                ((8, 384, 6085), [7], None), ((2, 768, 16384), [1], 96)]
        for shape, rows, chans in plan:
            t0 = time.time()
            try:
                r = check_shape(*shape, rows, chans)
            except Exception:  # noqa: BLE001
                r = dict(shape=shape, ok=False, error=traceback.format_exc())
            r["seconds"] = round(time.time() - t0, 1)
            results.append(r)
            log(json.dumps(r, default=str))
        try:
            r = check_fp32()
        except Exception:  # noqa: BLE001
            r = dict(shape="fp32", ok=False, error=traceback.format_exc())
        results.append(r)
        log(json.dumps(r, default=str))
        log("CHECKS:", "ALL OK" if all(r.get("ok") for r in results) else "FAILURES")
    if not a.skip_variants:
        variants = time_variants(a.quick)
    rows = bench_scan.run(with_ref=not a.quick, log=log)
    if OUT:
        with open(os.path.join(OUT, "gpu_check_scan.json"), "w") as f:
            json.dump(dict(checks=results, variants=variants, table=rows), f, indent=1, default=str)


if __name__ == "__main__":
    main()
