"""Checkpoints (DeepSpeed's format + our client state) and the encoder export (safetensors + json).

Layout: output_dir/checkpoints/step_00000120/ holds DeepSpeed's files; the file COMPLETE is written
into it only after every rank has finished writing, so a checkpoint cut off mid-write is never taken
as the latest. Resume picks the newest folder that has COMPLETE.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

COMPLETE = "COMPLETE"


def checkpoint_root(output_dir):
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir):
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file() and not p.name.endswith("_universal"))


def latest_checkpoint(output_dir):
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume, output_dir):
    """train.resume -> a checkpoint folder or None: 'auto' = the newest complete one, 'none' = start fresh."""
    if resume in ("", "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint folder (no {COMPLETE} file)")
    return path


def save_checkpoint(engine, output_dir, step, client_state, keep, is_main):
    """Save on ALL ranks (DeepSpeed requires it), mark complete, prune old ones. Returns the folder."""
    root = checkpoint_root(output_dir)
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.distributed.barrier()
    folder = root / tag
    if is_main:
        world_size = torch.distributed.get_world_size()
        (folder / COMPLETE).write_text(json.dumps({"step": step, "world_size": world_size}))
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(str(old) + "_universal", ignore_errors=True)
    torch.distributed.barrier()
    return folder


def saved_world_size(folder):
    """The number of ranks that wrote a complete checkpoint (None for checkpoints that do not say)."""
    return json.loads((Path(folder) / COMPLETE).read_text()).get("world_size")


def partitioned_for_other_ranks(folder, world_size):
    """Whether a checkpoint holds ZeRO optimizer partitions laid out for another number of ranks (and so must be
    made universal first). ZeRO-0 keeps the whole optimizer state in the model file: it loads on any number."""
    return (saved_world_size(folder) not in (None, world_size)
            and any(Path(folder).glob("*optim_states.pt")))


def to_universal(folder, is_main):
    """DeepSpeed's universal form of a checkpoint (written once, beside it): what a run on another number of
    ranks loads, since ZeRO's optimizer partitions are laid out per rank. Returns its folder."""
    target = Path(str(folder) + "_universal")
    if is_main and not (target / COMPLETE).is_file():
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
                        "--output_folder", str(target), "--inject_missing_state", "--num_extract_workers", "1",
                        "--num_merge_workers", "1"], check=True, stdout=subprocess.DEVNULL)
        (target / COMPLETE).write_text((Path(folder) / COMPLETE).read_text())
    torch.distributed.barrier()
    return target


def load_checkpoint(engine, folder):
    """Restore module, optimizer and engine state; returns our client state."""
    path, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
    _step_counts_beside_params(engine.optimizer)
    return client_state


def _step_counts_beside_params(optimizer):
    """Fused AdamW needs its step counts on the parameters' device; DeepSpeed's universal-checkpoint load
    leaves them on the CPU (found on 2 H100s: the first step after a 4 -> 2 GPU resume failed)."""
    base = getattr(optimizer, "optimizer", optimizer)
    for group in base.param_groups:
        if not group.get("fused"):
            continue
        for param in group["params"]:
            step = base.state.get(param, {}).get("step")
            if torch.is_tensor(step) and step.device != param.device:
                base.state[param]["step"] = step.to(param.device)


def export_encoder(state_dict, model_config, path):
    """Write encoder weights as safetensors and its model config (timm name + kwargs) beside it as json."""
    from safetensors.torch import save_file
    path = Path(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(model_config, indent=2))
    return path


def read_export_config(path):
    """The model config export_encoder wrote beside the weights at `path`, or None (e.g. a public checkpoint)."""
    meta = Path(path).with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else None
