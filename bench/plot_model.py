"""Plot of Vim against DeiT end to end: images/s against resolution, inference and training, from the markdown table
that `python -m bench.bench_model` prints (saved to a file).

    python bench/plot_model.py [--table results/bench_model_h100.md] [--out results/bench_model_h100.png]
"""
import argparse
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CELL = r"([\d,]+) \(([\d,]+) MiB\)"   # images/s (peak MiB)
ROW = re.compile(rf"^\| (infer|train) \| (\d+) \| (\d+) \| (\w+) \| {CELL} \| {CELL}")


def read_table(path):
    """{(mode, model): [(size, vim images/s, deit images/s), ...]}, {(mode, size): batch} and the table's first
    line (card, versions)."""
    lines = open(path).read().splitlines()
    rows, batches = {}, {}
    for line in lines:
        found = ROW.match(line)
        if found:
            mode, size, batch, model, vim, _, deit, _ = found.groups()
            rows.setdefault((mode, model), []).append((int(size), float(vim.replace(",", "")),
                                                       float(deit.replace(",", ""))))
            batches[mode, int(size)] = int(batch)
    if not rows:
        raise SystemExit(f"{path}: no rows of bench_model's table found")
    return rows, batches, lines[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="results/bench_model_h100.md")
    parser.add_argument("--out", default="results/bench_model_h100.png")
    args = parser.parse_args()
    rows, batches, header = read_table(args.table)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"tiny": "tab:blue", "small": "tab:orange", "base": "tab:green"}
    for ax, mode in zip(axes[:2], ("infer", "train")):
        for (row_mode, model), points in rows.items():
            if row_mode != mode:
                continue
            sizes, vim, deit = zip(*points)
            ax.plot(sizes, vim, "o-", color=colors.get(model), label=f"Vim-{model[0].upper()}")
            ax.plot(sizes, deit, "s--", color=colors.get(model), label=f"DeiT-{model[0].upper()}")
        per_size = ", ".join(f"{size}: {batch}" for (m, size), batch in sorted(batches.items()) if m == mode)
        ax.set(xscale="log", yscale="log", xlabel="image size (px)", ylabel="images/s",
               title=f"{'inference' if mode == 'infer' else 'training step'}\nbatch at {per_size}")
    for (mode, model), points in rows.items():
        sizes, vim, deit = zip(*points)
        axes[2].plot(sizes, [v / d for v, d in zip(vim, deit)], "o-" if mode == "infer" else "^--",
                     color=colors.get(model), label=f"{model}, {mode}")
    axes[2].axhline(1.0, color="gray", lw=0.8)
    axes[2].set(xscale="log", xlabel="image size (px)", ylabel="Vim / DeiT images/s", title="ratio (1 = parity)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.set_xticks(sorted({s for points in rows.values() for s, _, _ in points}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
    fig.suptitle(header, fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
