"""CPU time of the token-grouping analysis for one image: 196 tokens x 12 blocks (a ViT-S/16-sized model at 224).

Times ``token_spectrum`` (affinity spectrum, significant count, effective rank, eigengap cluster count) and
``spectral_clusters`` (k = 2, the paper's masks) over 12 random (1, 196, C) token sets, the median of repeated
runs, for the given torch thread counts. Writes ``token_spectrum_speed.csv`` next to this file (or to ``--out``),
with the 1-minute load average: on a busy machine, more threads than free cores make LAPACK much slower.

    python benchmarks/token_spectrum_speed.py --threads 1 2
"""
import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from fan.analysis import spectral_clusters, token_spectrum

NUM_BLOCKS = 12
NUM_TOKENS = 196


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--threads', type=int, nargs='+', default=[1], help='torch thread counts (default 1)')
    parser.add_argument('--out', default=str(Path(__file__).with_suffix('.csv')))
    args = parser.parse_args()

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for channels in (192, 384):
            blocks = [torch.randn(1, NUM_TOKENS, channels) for _ in range(NUM_BLOCKS)]
            for operation, run in (
                    ('token_spectrum', lambda: [token_spectrum(tokens) for tokens in blocks]),
                    ('spectral_clusters_k2', lambda: [spectral_clusters(tokens, 2) for tokens in blocks]),
            ):
                seconds = median_seconds(run, args.repeats)
                rows.append(dict(operation=operation, tokens=NUM_TOKENS, channels=channels, blocks=NUM_BLOCKS,
                                 threads=threads, median_s_per_image=round(seconds, 4), repeats=args.repeats,
                                 load_average=round(os.getloadavg()[0], 2), torch=torch.__version__,
                                 cpu=platform.processor() or platform.machine()))
                print(f'{operation:22s} C={channels:3d} threads={threads}: {seconds * 1000:7.1f} ms '
                      f'for {NUM_BLOCKS} blocks x {NUM_TOKENS} tokens')
    with open(args.out, 'w', newline='') as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
