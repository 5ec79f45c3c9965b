"""The one logging path of every run: metrics.jsonl, TensorBoard, a tqdm bar and a loss-curve PNG (rank 0)."""
import json
import math
from pathlib import Path

from tqdm import tqdm


class RunLogger:
    """Writes metrics on rank 0; a no-op elsewhere."""

    def __init__(self, output_dir, is_main, total_steps, initial_step=0):
        self.is_main = is_main
        self.output_dir = Path(output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.bar = self.tb = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.output_dir / "tensorboard"))
            self.bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, desc="train")

    def log(self, step, metrics):
        """Append one JSON line {step, **metrics} and mirror it to TensorBoard."""
        if not self.is_main:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, float) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record.get('lr', 0):.2e}")

    def advance(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.is_main:
            self.bar.close()
            self.tb.close()


def truncate_metrics(path, after_step):
    """Drop lines logged after `after_step` (a resumed run re-logs them, so the file stays one curve)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def plot_curves(metrics_path, png_path, keys=("loss",)):
    """A PNG of each key in metrics.jsonl against step (the ones present)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
