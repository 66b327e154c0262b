"""Interleaved streaming-read probe / cpu chebyshev_forecast pairs: the forecast's effective
bandwidth as a fraction of the probe's, call by call.

    .venv/bin/python scripts/chebyshev_stream_pairs.py [--pairs 12] [--n 12582912] [--dtypes fp32,bf16]

Shared machines drift by tens of percent within seconds, so every forecast call is timed right
after a probe call and the ratio of the two is taken per pair; the script prints the median,
min and max ratio per dtype. The shape is the bench's (FLUX 1024^2 feature, K = 14, S = 1,
degree 4, one query); bytes = K N + N elements read and written.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import diffkern
from diffkern.bench.chebyshev import SPECTRUM_STEPS_A075

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--n", type=int, default=4096 * 3072, help="features per snapshot (N)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    probe_buf = torch.ones(256 * 2**20 // 4)
    probe_bytes = probe_buf.numel() * 4
    times = torch.tensor([float(t) for t in SPECTRUM_STEPS_A075], dtype=torch.float64)
    K, N = len(times), args.n
    t_query = torch.tensor([47.0], dtype=torch.float64)
    feats = {name: torch.randn(1, K, N, generator=torch.Generator().manual_seed(0)).to(DTYPES[name])
             for name in args.dtypes.split(",")}

    def probe():
        torch.ops.diffkern.stream_read_probe(probe_buf)

    ratios = {name: [] for name in feats}
    ms = {name: [] for name in feats}
    with diffkern.use_backend("cpu"):
        for name, f in feats.items():          # warm-up: page in the inputs, build the weights path
            diffkern.ops.chebyshev_forecast(times, f, t_query)
        probe()
        for _ in range(args.pairs):
            for name, f in feats.items():
                tp = _seconds(probe)
                tf = _seconds(lambda: diffkern.ops.chebyshev_forecast(times, f, t_query))
                fc_bytes = (K + 1) * N * f.element_size()
                ratios[name].append((fc_bytes / tf) / (probe_bytes / tp))
                ms[name].append(tf * 1e3)
    print(f"{args.pairs} interleaved probe/forecast pairs, K={K} N={N}, {torch.get_num_threads()} threads")
    for name in feats:
        r = ratios[name]
        print(f"{name}: forecast median {statistics.median(ms[name]):.1f} ms; % of probe: median "
              f"{100 * statistics.median(r):.0f}, min {100 * min(r):.0f}, max {100 * max(r):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
