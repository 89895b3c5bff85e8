"""`fan bench` on its defaults, on the CPU: every FAN model and the timm baselines (DeiT, XCiT, Swin, ConvNeXt).

fp32, batch 8, 2 warm-up + 5 timed steps (median), each model and mode in a fresh child process; parameters,
fvcore GMACs, inference / training throughput and peak memory. Writes benchmarks/results/zoo_cpu/ (bench.csv,
bench.json, plots). Long: about an hour on 2 cores; --resume continues an interrupted run.

    python benchmarks/zoo_cpu.py [more `fan bench` options, e.g. --resume or --threads 2]
"""
import sys
from pathlib import Path

from fan.cli import main

OUT = Path(__file__).resolve().parent / 'results' / 'zoo_cpu'

if __name__ == '__main__':
    sys.exit(main(['bench', '--device', 'cpu', '--out', str(OUT), *sys.argv[1:]]))
