"""Side by side: the loss curves and final metrics of several runs (e.g. one task on 1, 2 and 4 GPUs).

    python -m bench.compare_runs RUN_DIR... [--windows 20] [--plot curves.png]

Prints a markdown row per run: the mean training loss over consecutive windows of steps, the final evaluation
metrics of results.json, and images/s: the median window's, and over the whole run after its first window (the
steps' total time, so the slow windows, e.g. those with an epoch start, count); --plot draws every run's loss
against step in one figure per run-name prefix (the part before the first "_").
"""
import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from engine.metrics import read_metrics

EVAL_KEYS = ("top1", "ema_top1", "zeroshot_top1", "zeroshot_top5")


def summary(run_dir, window):
    records = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]
    last = max((r["step"] for r in records), default=0)
    means = []
    for lo in range(0, last, window):
        losses = [r["loss"] for r in records if lo < r["step"] <= lo + window]
        means.append(f"{statistics.fmean(losses):.4f}" if losses else "-")
    results_path = Path(run_dir) / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    evals = ", ".join(f"{k} {results[k]:.2f}" for k in EVAL_KEYS if k in results)
    timed = [r for r in records if "images_per_s" in r]
    speed = [r["images_per_s"] for r in timed]
    # images / seconds = sum of the windows' steps / sum of steps / rate (the batch size cancels)
    windows = [(b["step"] - a["step"], b["images_per_s"]) for a, b in zip(timed, timed[1:])]
    overall = sum(n for n, _ in windows) / sum(n / rate for n, rate in windows) if windows else 0.0
    return records, means, evals, (statistics.median(speed) if speed else 0.0), overall


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--windows", type=int, default=20, help="steps per loss window")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    curves = defaultdict(list)
    print(f"| run | mean loss per {args.windows} steps | final eval | images/s, median window | images/s, run |\n"
          "|---|---|---|---|---|")
    for run in args.runs:
        records, means, evals, speed, overall = summary(run, args.windows)
        name = Path(run).name
        curves[name.split("_")[0]].append((name, records))
        print(f"| {name} | {' / '.join(means)} | {evals or '-'} | {speed:,.0f} | {overall:,.0f} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
        for ax, (group, runs) in zip(axes[0], curves.items()):
            for name, records in runs:
                ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=name, lw=1)
            ax.set_title(group)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
