"""The CIFAR-10 evidence figure of RESULTS.md from the runs' own files (results/evidence_cifar10/).

    python bench/plot_evidence.py [--runs results/evidence_cifar10] [--out results/evidence_cifar10.png]

Left: cifar10-val top-1 after each epoch of the supervised or fine-tuning phase of every arm. Middle: the same for
the runs with train.cuda_graph (calls 8 to 14: the short and the longer equal-time budget, two MAE variants, and
the MAE arm fine-tuned without layer-wise lr decay). Right: the final top-1
of each run against its arm's total GPU minutes (pretraining + fine-tuning, wall time of each run on its own H100,
from run_times.txt, which holds the "== NAME: exit S, T s" lines bench/device_evidence.sh prints); the graphed
runs as triangles. The MAE variants are drawn on the left only: they ran under DeepSpeed ZeRO-0 (call 5 two to a
GPU), so their wall times are not comparable with the arms' (RESULTS.md). CLIP's arm ran in call 7 beside DeiT-T's
second seed on one GPU.
"""
import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# arm label -> (fine-tuning run, pretraining run or None) per seed
ARMS = {
    "supervised, 12 epochs": [("sup12_s0", None), ("sup12_s1", None)],
    "supervised, 6 epochs": [("sup6_s0", None), ("sup6_s1", None)],
    "MAE 10 ep. -> fine-tune 6": [("mae10_s0_ft6", "mae10_s0"), ("mae10_s1_ft6", "mae10_s1")],
    "CLIP 4 ep. -> fine-tune 6": [("clip4_s0_ft6", "clip4_s0_call7")],
    "DeiT-T supervised, 12 epochs": [("deit12_s0", None), ("deit12_s1", None)],
}
# the same, every run with train.cuda_graph under ZeRO-0 (calls 8 and 9), two MAE variants (calls 10 and 11), and the
# MAE arm fine-tuned without layer decay (calls 13 and 14)
GRAPHED = {
    "supervised, 12 epochs": [("sup12_s0_graph", None), ("sup12_s1_graph", None)],
    "MAE 10 ep. -> fine-tune 6": [("mae10_s0_ft6_graph", "mae10_s0_graph"), ("mae10_s1_ft6_graph", "mae10_s1_graph")],
    "supervised, 20 epochs": [("sup20_s0_graph", None)],
    "MAE 16 ep. -> fine-tune 12": [("mae16_s0_ft12_graph", "mae16_s0_graph")],
    "MAE 10 ep., 2x2 block masking -> fine-tune 6": [
        (f"mae10_s{seed}_mask_block-2_ft6_graph", f"mae10_s{seed}_mask_block-2_graph") for seed in (0, 1)],
    "MAE 10 ep., Vim decoder + mask 0.5 -> fine-tune 6": [
        (f"mae10_s{seed}_decoder-vim_mask_ratio-0.5_ft6_graph", f"mae10_s{seed}_decoder-vim_mask_ratio-0.5_graph")
        for seed in (0, 1)],
    "MAE 10 ep. -> fine-tune 6, no layer decay": [
        ("mae10_s0_ft6_ld1.0_graph", "mae10_s0_graph_call13"), ("mae10_s1_ft6_ld1.0_graph", "mae10_s1_graph_call14")],
}
# variant label -> fine-tuning runs (MAE 10 epochs with one change -> fine-tune 6), curves only
MAE_VARIANTS = {
    "MAE variant: mask ratio 0.5": ["mae10_s0_mask_ratio-0.5_ft6", "mae10_s1_mask_ratio-0.5_ft6"],
    "MAE variant: 1-block decoder": ["mae10_s0_decoder_depth-1_ft6"],
    "MAE variant: pixel loss without norm-pix": ["mae10_s0_norm_pix_loss-false_ft6"],
    "MAE variant: mask tokens kept in the encoder": ["mae10_s0_mask_mode-keep_ft6"],
    "MAE variant: Vim decoder": ["mae10_s0_decoder-vim_ft6"],
    "MAE variant: 16 pretraining epochs": ["mae16_s0_ft6"],
}


def top1_per_epoch(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["top1"] for r in records if "top1" in r]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="results/evidence_cifar10")
    parser.add_argument("--out", default="results/evidence_cifar10.png")
    args = parser.parse_args()
    runs = Path(args.runs)
    seconds = {}
    for line in (runs / "run_times.txt").read_text().splitlines():
        found = re.search(r"== (\S+): exit \d+, (\d+) s", line)
        if found:
            seconds[found[1]] = int(found[2])  # a later line (a re-run) replaces an earlier one
    fig, (curves, graphed, budget) = plt.subplots(1, 3, figsize=(18, 4.8))
    colors = plt.cm.tab10.colors + plt.cm.Dark2.colors  # one per arm and variant (11 > tab10's 10)

    def draw_arms(arms, arm_colors, axes, marker, suffix):
        for color, (label, seeds) in zip(arm_colors, arms.items()):
            for i, (finetune, pretrain) in enumerate(seeds):
                top1 = top1_per_epoch(runs / finetune)
                name = label + suffix if i == 0 else None
                axes.plot(range(1, len(top1) + 1), top1, marker + "-", color=color, label=name, ms=3)
                minutes = (seconds[finetune] + (seconds[pretrain] if pretrain else 0)) / 60
                budget.scatter(minutes, top1[-1], color=color, marker=marker, label=name)

    draw_arms(ARMS, colors, curves, "o", "")
    # graphed arms: the eager arms' colours for the short budget, darker ones for the longer budget and the variants
    draw_arms(GRAPHED, (colors[0], colors[2], "#08306b", "#00441b", "#7f2704", "#54278f", "#e7298a"), graphed, "^",
              ", graphed")
    for color, (label, finetunes) in zip(colors[len(ARMS):], MAE_VARIANTS.items()):
        for i, finetune in enumerate(finetunes):
            top1 = top1_per_epoch(runs / finetune)
            curves.plot(range(1, len(top1) + 1), top1, "s--", color=color, label=label if i == 0 else None, ms=3)
    curves.set(xlabel="epoch of the supervised / fine-tuning phase", ylabel="cifar10-val top-1 (%)",
               title="Vim-T 32x32: top-1 after each epoch")
    graphed.set(xlabel="epoch of the supervised / fine-tuning phase", ylabel="cifar10-val top-1 (%)",
                title="train.cuda_graph: two equal-time budgets")
    budget.set(xlabel="GPU minutes of the arm (pretraining + fine-tuning, one H100)", ylabel="final top-1 (%)",
               title="final top-1 against the arm's GPU time")
    for ax in (curves, graphed, budget):
        ax.grid(alpha=0.3)
    curves.legend(fontsize=7, loc="lower right")
    graphed.legend(fontsize=8, loc="lower right")
    low, high = budget.get_ylim()
    budget.set_ylim(low, high + 0.8 * (high - low))  # room above the points for the legend
    budget.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
