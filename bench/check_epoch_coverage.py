"""Count what one training epoch reads over all ranks and workers: every sample once, none twice.

    deepspeed --num_gpus 4 bench/check_epoch_coverage.py --config CONFIG [key.sub=value ...]

Builds each rank's training loader exactly as the entry points do (the config's shards, batch size, workers,
seed; decoding only the sample keys), reads epoch 0 (and 1 with --epochs 2), gathers the keys on rank 0 and
prints per epoch: samples the epoch plan calls for, read, distinct, read twice or more, and the dataset samples
never read (the remainder that does not fill a global batch; with data.repeated_aug = k, an image's k copies in its
batch count as one read, and an epoch reads about 1 / k of the samples). Exits 1 if any sample was read twice.
"""
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from engine.distributed import all_gather_object  # noqa: E402
from engine.setup import parse_args, resolve_shards  # noqa: E402


def main(argv=None):
    def add_arguments(parser):
        parser.add_argument("--epochs", type=int, default=1)

    args, cfg, dist = parse_args(argv, __doc__, lambda a: "configs/pretrain/mae_demo.yaml", add_arguments)
    urls, _, num_samples, _ = resolve_shards(cfg)
    info = data.build_loader(urls, fields=("key",), batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                             seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, num_samples=num_samples,
                             resampled=cfg.data.resampled, shuffle_buffer=cfg.data.shuffle_buffer, pin_memory=False,
                             repeated_aug=cfg.data.repeated_aug)
    repeats = cfg.data.repeated_aug
    duplicated = 0
    for epoch in range(args.epochs):
        info.set_epoch(epoch)
        keys = [k for batch in info.loader for k in (dict.fromkeys(batch["key"]) if repeats > 1 else batch["key"])]
        gathered = all_gather_object(keys)
        if dist.is_main:
            counts = Counter(k for rank_keys in gathered for k in rank_keys)
            twice = sum(1 for c in counts.values() if c > 1)
            duplicated += twice
            planned = info.steps_per_epoch * -(-cfg.data.batch_size // repeats) * dist.world_size
            print(f"epoch {epoch}: {dist.world_size} ranks x {max(1, cfg.data.num_workers)} workers, "
                  f"planned {planned}, read {sum(counts.values())}, distinct {len(counts)}, read twice or more {twice}, "
                  f"per rank {[len(k) for k in gathered]}, dataset {info.num_samples}, "
                  f"never read {info.num_samples - len(counts)}", flush=True)
    if dist.is_main and duplicated:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
