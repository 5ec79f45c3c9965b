"""The design-space ablation figure of RESULTS.md from the rows' own files (results/ablation_cifar10/).

    python bench/plot_ablation.py [--runs results/ablation_cifar10] [--out results/ablation_cifar10.png]

One pair of bars per row of bench/ablation_cifar10.sh: final cifar10-val top-1 from scratch and after MAE
pretraining + fine-tuning (results.json of scratch/ROW and mae_ft/ROW); a row without a result gets no bar.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROWS = {  # row -> label, in the order of RESULTS.md's table
    "base": "middle cls, v2\n(default)", "cls_head": "head cls", "cls_double": "double cls", "cls_mean": "mean pool",
    "cls_max": "max pool", "bidir_none": "bidir none", "bidir_sequence": "bidir\nsequence",
    "bidir_block": "bidir block", "bidir_ssm": "bidir SSM", "scan_4dir": "4 directions",
}
ARMS = {"scratch": "from scratch (4 epochs)", "mae_ft": "MAE (8 epochs) + fine-tune (4 epochs)"}


def final_top1(path):
    return json.loads(path.read_text())["top1"] if path.is_file() else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="results/ablation_cifar10")
    parser.add_argument("--out", default="results/ablation_cifar10.png")
    args = parser.parse_args()
    runs = Path(args.runs)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.4
    for i, (arm, label) in enumerate(ARMS.items()):
        xs = [x + (i - 0.5) * width for x in range(len(ROWS))]
        top1 = [final_top1(runs / arm / row / "results.json") for row in ROWS]
        ax.bar(xs, [float("nan") if t is None else t for t in top1], width, color=f"C{i}", label=label)
        for x, t in zip(xs, top1):
            if t is not None:
                ax.text(x, t + 0.3, f"{t:.1f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(ROWS)), list(ROWS.values()), fontsize=8)
    ax.set(ylabel="cifar10-val top-1 (%)", ylim=(30, 55),
           title="Vim-T 32x32, one design change per row (one seed; the seed spread is about 0.3 points)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
