"""FAN-ViT tiny/small against XCiT tiny/small (their closest timm relatives) in one run, on the CPU.

fp32, batch 16, 2 threads, 2 warm-up + 5 timed steps (median): inference and training throughput, training peak
memory (a fresh child process per model and mode), and the gradient-checkpointing memory cut at batch 32.
Writes benchmarks/results/fan_vs_xcit/ (fan_vs_peer.csv with the ratios, bench.csv/json per pass).

    python benchmarks/fan_vs_xcit.py [more `fan bench-peers` options, e.g. --resume]
"""
import sys
from pathlib import Path

from fan.cli import main

OUT = Path(__file__).resolve().parent / 'results' / 'fan_vs_xcit'

if __name__ == '__main__':
    sys.exit(main(['bench-peers', '--batch-size', '16', '--threads', '2', '--ckpt-batch-size', '32',
                   '--out', str(OUT), *sys.argv[1:]]))
