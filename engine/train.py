"""The one training loop: every objective (MAE, CLIP) and task (classification, linear probe) runs here.

The trained module is an nn.Module whose forward(batch) returns (loss, {name: scalar tensor}). Optional
hooks it may define:
    evaluate_batch(batch) -> {name: (sum, count)}   evaluation, reduced over batches and ranks
    best_metric: str                                  an evaluate_batch key whose maximum is tracked
    plot_keys: tuple                                  metrics drawn in loss_curve.png beside loss and lr
    on_step_end()                                     after each optimizer step (clamps, EMA updates)
    visualize(path)                                   at each checkpoint, on every rank (path None off rank 0)
    export_state() -> (state_dict, model_config)      the encoder written at the end as safetensors
    extra_state() / load_extra_state(state)           state kept outside the engine (e.g. EMA weights)
    graph_network(wrap)                               train.cuda_graph / train.compile: route the training network
                                                      call through wrap(module, method), a cuda_graph.GraphedTraining
"""
import contextlib
import functools
import json
import math
import signal
import time
from pathlib import Path

import torch

from .checkpoint import (export_encoder, load_checkpoint, partitioned_for_other_ranks, resolve_resume, save_checkpoint,
                         to_universal)
from .config import config_to_dict, save_config
from .cuda_graph import GraphedTraining, check_compile, check_cuda_graph
from .deepspeed_setup import (backward_and_step, gathered_parameters, initialize_engine, load_deepspeed_config,
                              zero_stage)
from .distributed import all_gather_object, all_reduce_sum, rng_state, set_rng_state
from .metrics import RunLogger, plot_curves, truncate_metrics
from .optim import build_optimizer, build_param_groups, build_scheduler, peak_lr


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


def autocast_dtype(precision, device):
    """The autocast dtype of train.precision (None = no autocast)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else None


def _to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def evaluate(module, data, dist, precision, lockstep=False):
    """Run module.evaluate_batch over one pass of `data`; returns {name: sum / count} over all ranks.

    lockstep: every rank makes the same number of forward passes (ZeRO-3 gathers parameters in each one);
    a rank that ran out of batches repeats its last one and discards the result.
    """
    module.eval()
    sums = {}
    dtype = autocast_dtype(precision, dist.device)
    data.set_epoch(0)
    batches, last = iter(data.loader), None
    with torch.no_grad(), torch.autocast(dist.device.type, dtype=dtype, enabled=dtype is not None):
        while True:
            batch = next(batches, None)
            if lockstep and all_reduce_sum([float(batch is not None)], dist.device)[0] > 0 and batch is None:
                module.evaluate_batch(_to_device(last, dist.device))
                continue
            if batch is None:
                break
            last = batch
            for name, (total, count) in module.evaluate_batch(_to_device(batch, dist.device)).items():
                s, c = sums.get(name, (0.0, 0.0))
                sums[name] = (s + float(total), c + float(count))
    module.train()
    names = sorted(sums)
    reduced = all_reduce_sum([v for n in names for v in sums[n]], dist.device)
    return {n: reduced[2 * i] / max(reduced[2 * i + 1], 1.0) for i, n in enumerate(names)}


def train(cfg, module, data, dist, eval_data=None):
    """Train `module` on `data` (a data.DataInfo) under DeepSpeed as `cfg` says; returns final metrics.

    Checkpoints every train.save_every steps and at the end, resumes per train.resume, evaluates every
    train.eval_every epochs, writes metrics.jsonl / TensorBoard / loss curve and the exported encoder.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
    tc = cfg.train
    module.to(dist.device)
    global_batch = cfg.data.batch_size * tc.grad_accum * dist.world_size
    lr = peak_lr(cfg.optim, global_batch)
    optimizer = build_optimizer(cfg.optim, build_param_groups(module, cfg.optim.weight_decay, cfg.optim.layer_decay),
                                lr, dist.device)
    ds_config = load_deepspeed_config(cfg.deepspeed, cfg.data.batch_size, tc.grad_accum, tc.clip_grad)
    resume_from = resolve_resume(tc.resume, out)
    if resume_from is not None and partitioned_for_other_ranks(resume_from, dist.world_size):
        # saved on another number of ranks: load DeepSpeed's universal form of it
        resume_from = to_universal(resume_from, dist.is_main)
        ds_config["checkpoint"] = {"load_universal": True}
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    if tc.cuda_graph:
        check_cuda_graph(module, dist.device, zero_stage(ds_config), tc.grad_accum)
    if tc.compile:
        check_compile(module, zero_stage(ds_config))
    if tc.cuda_graph or tc.compile:
        capture = torch.cuda.make_graphed_callables if tc.cuda_graph else None
        module.graph_network(functools.partial(GraphedTraining, capture=capture, compile=tc.compile))
    engine, optimizer = initialize_engine(module, optimizer, ds_config)
    steps_per_epoch = data.steps_per_epoch // tc.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch of {data.num_samples} samples gives no optimizer step at global batch {global_batch}")
    total_steps = tc.epochs * steps_per_epoch
    stop_step = min(total_steps, tc.max_steps) if tc.max_steps > 0 else total_steps
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps, steps_per_epoch)
    if dist.is_main:
        print(f"global batch {global_batch} ({dist.world_size} ranks x {cfg.data.batch_size} x {tc.grad_accum} accum), "
              f"peak lr {lr:.3g}, {steps_per_epoch} steps/epoch, {stop_step} of {total_steps} steps, "
              f"{n_params / 1e6:.2f}M trainable parameters", flush=True)

    step, epoch, best = 0, 0, None
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from)
        step, epoch, best = state["step"], state["epoch"], state.get("best")
        if state["world_size"] == dist.world_size:
            set_rng_state(state["rng"][dist.rank])
            data.load_state_dict(state["data"][dist.rank])
        else:  # another split of the stream: the data restarts the checkpoint's epoch (it warns)
            data.load_state_dict(state["data"][0])
        if hasattr(module, "load_extra_state") and state.get("extra") is not None:
            module.load_extra_state(state["extra"])
        if dist.is_main:
            truncate_metrics(out / "metrics.jsonl", step)
            print(f"resumed from {resume_from} at step {step}", flush=True)
    elif dist.is_main and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()

    # SIGTERM (a scheduler's pre-emption, `timeout`) ends the run at the next step with a checkpoint and an export
    terminated = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        # the DataLoader workers of our process group die of the same signal: their exit must not raise here
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    logger = RunLogger(out, dist.is_main, stop_step, initial_step=step)
    dtype = autocast_dtype(tc.precision, dist.device)
    bad_in_row = bad_total = 0
    window = {"loss": 0.0, "n": 0, "t0": time.time(), "data_time": 0.0, "steps": 0}
    extra_metrics = {}

    def checkpoint_now():
        client_state = {
            "step": step, "epoch": epoch, "best": best, "world_size": dist.world_size,
            "data": all_gather_object(data.state_dict()), "rng": all_gather_object(rng_state()),
            "extra": module.extra_state() if hasattr(module, "extra_state") else None,
            "config": config_to_dict(cfg),
        }
        folder = save_checkpoint(engine, out, step, client_state, tc.keep_checkpoints, dist.is_main)
        if hasattr(module, "visualize"):
            module.visualize(folder.parent.parent / f"reconstruction_step{step:08d}.png" if dist.is_main else None)
        if dist.is_main:
            plot_curves(out / "metrics.jsonl", out / "loss_curve.png",
                        keys=("loss", "lr", *getattr(module, "plot_keys", ())))

    def run_eval():
        nonlocal best
        if eval_data is None or not hasattr(module, "evaluate_batch"):
            return {}
        metrics = evaluate(engine.module, eval_data, dist, tc.precision, lockstep=engine.zero_optimization_stage() == 3)
        key = getattr(module, "best_metric", None)
        if key in metrics and (best is None or metrics[key] > best):
            best = metrics[key]
            metrics[f"best_{key}"] = best
            _export(engine, module, out / "best_encoder.safetensors", dist)
        logger.log(step, {**metrics, "epoch": epoch})
        return metrics

    while step < stop_step and epoch < tc.epochs:
        data.set_epoch(epoch)
        micro = 0
        t_data = time.time()
        for batch in _batches(data.loader, terminated):
            window["data_time"] += time.time() - t_data
            if micro % tc.grad_accum == 0:
                scheduler.step_update(step)
            micro += 1
            batch = _to_device(batch, dist.device)
            # a graph must not replay weight casts cached by an autocast region that has ended
            with torch.autocast(dist.device.type, dtype=dtype, enabled=dtype is not None,
                                cache_enabled=not tc.cuda_graph):
                loss, metrics = engine(batch)
            # loss.item() syncs with the device; the NaN guard needs the value on the host anyway
            loss_value = loss.item()
            # one collective per micro-step: do all ranks have a finite loss, has any rank been sent SIGTERM
            non_finite, stop_votes = all_reduce_sum([float(not math.isfinite(loss_value)), float(bool(terminated))],
                                                    dist.device)
            if non_finite > 0:
                bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                if dist.is_main:
                    print(f"non-finite loss at step {step}: batch skipped ({bad_in_row} in a row)", flush=True)
                if bad_in_row >= tc.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{bad_in_row} non-finite losses in a row at step {step}; stopping. The last complete "
                        f"checkpoint in {out / 'checkpoints'} is kept: lower the lr or check the data.")
                t_data = time.time()
                continue
            bad_in_row = 0
            boundary = engine.is_gradient_accumulation_boundary()
            backward_and_step(engine, loss, tc.clip_grad)
            window["loss"] += loss_value
            window["n"] += 1
            for k, v in metrics.items():
                extra_metrics[k] = extra_metrics.get(k, 0.0) + float(v)
            if boundary:
                step += 1
                window["steps"] += 1
                if hasattr(module, "on_step_end"):
                    module.on_step_end()
                logger.advance()
                if step % tc.log_every == 0 or step == stop_step:
                    logger.log(step, _window_record(window, extra_metrics, data, dist, optimizer, epoch,
                                                    global_batch, bad_total))
                    window = {"loss": 0.0, "n": 0, "t0": time.time(), "data_time": 0.0, "steps": 0}
                    extra_metrics = {}
                if tc.save_every > 0 and step % tc.save_every == 0 and step < stop_step:
                    checkpoint_now()
                if step >= stop_step:
                    break  # mid-epoch: the final checkpoint records the data position
                if stop_votes > 0:
                    if dist.is_main:
                        print(f"terminated at step {step}: saving a checkpoint and the export", flush=True)
                    break
            t_data = time.time()
        else:
            if terminated:
                break  # the loader's workers were terminated with us
            epoch += 1
            if tc.eval_every > 0 and epoch % tc.eval_every == 0 and epoch < tc.epochs:
                run_eval()
            continue
        break
    final_eval = run_eval() if not terminated else {}
    checkpoint_now()
    _export(engine, module, out / "encoder.safetensors", dist)
    signal.signal(signal.SIGTERM, previous_handler)
    results = {"step": step, "epoch": epoch, "interrupted": bool(terminated), **final_eval}
    if best is not None:
        results["best"] = best
    if dist.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=2))
    logger.close()
    # release DeepSpeed's hooks and pending communication handles while the process group is still up: a gloo
    # rank once aborted at interpreter exit after a ZeRO-3 run
    engine.destroy()
    return results


def _batches(loader, terminated):
    """The loader's batches; after SIGTERM, a loader whose workers were killed with us ends quietly (a worker
    killed mid-handover shows as a RuntimeError, or as a ConnectionResetError from the shared-memory handshake)."""
    batches = iter(loader)
    while True:
        try:
            yield next(batches)
        except StopIteration:
            return
        except (RuntimeError, OSError):
            if terminated:
                return
            raise


def _window_record(window, extra_metrics, data, dist, optimizer, epoch, global_batch, bad_total):
    """The metrics of the steps since the last log line, averaged over ranks."""
    names = sorted(extra_metrics)
    sums = all_reduce_sum([window["loss"], window["n"], float(data.skipped()), *[extra_metrics[k] for k in names]],
                          dist.device)
    elapsed = max(time.time() - window["t0"], 1e-9)
    return {
        "loss": sums[0] / max(sums[1], 1.0), "lr": optimizer.param_groups[0]["lr"], "epoch": epoch,
        "images_per_s": window["steps"] * global_batch / elapsed, "data_time_frac": window["data_time"] / elapsed,
        "skipped_samples": sums[2], "bad_steps": bad_total, **{k: s / max(sums[1], 1.0) for k, s in zip(names, sums[3:])},
    }


def _export(engine, module, path, dist):
    if not hasattr(module, "export_state"):
        return
    with gathered_parameters(module) if engine.zero_optimization_stage() == 3 else contextlib.nullcontext():
        if dist.is_main:
            state_dict, model_config = module.export_state()
            export_encoder(state_dict, model_config, path)
    torch.distributed.barrier()
