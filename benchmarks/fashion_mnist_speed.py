"""Training speed of the Fashion-MNIST study's models (the FAN micro models and their ViT / XCiT / ConvNet
baselines): does one 60,000-image epoch fit in 3 minutes on the project's 2 CPU cores?

    python benchmarks/fashion_mnist_speed.py --out benchmarks/results/fashion_mnist_speed_zen4.csv

Each model of ``fan.study.training.MODELS`` at its input size (1 channel, 10 classes), trained on in-memory random
tensors (the model's compute is what costs, not the loader) with AdamW and cross-entropy, plain and after
``fan.optimize``, in float32 and under bfloat16 autocast. The variants of a model alternate over ``--rounds`` rounds
of ``--steps`` timed steps, in this one process; each row gives the median images/s and the epoch time it implies.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fan  # noqa: E402
from fan.bench.runner import describe_machine  # noqa: E402
from fan.io import write_csv, write_json  # noqa: E402
from fan.study.training import MODELS, StudyModel, build_model  # noqa: E402

EPOCH = 60_000


def measure(spec: StudyModel, args: argparse.Namespace) -> List[Dict[str, Any]]:
    torch.manual_seed(0)
    images = torch.randn(args.batch, 1, spec.img_size, spec.img_size)
    labels = torch.randint(0, 10, (args.batch,))
    variants = {}
    for optimized in (False, True):
        for precision in ('fp32', 'bf16'):
            model = build_model(spec).train()
            if optimized:
                fan.optimize(model)
            variants[(optimized, precision)] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    params = sum(p.numel() for p in variants[(False, 'fp32')][0].parameters())

    def step(model, optimizer, precision):
        optimizer.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()

    rates = {key: [] for key in variants}
    for key, (model, optimizer) in variants.items():
        step(model, optimizer, key[1])  # warm-up
    for _ in range(args.rounds):
        for key, (model, optimizer) in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(model, optimizer, key[1])
            rates[key].append(args.steps * args.batch / (time.perf_counter() - start))
    rows = []
    for (optimized, precision), values in rates.items():
        rate = statistics.median(values)
        rows.append(dict(model=spec.key, arch=spec.arch, img_size=spec.img_size, params_m=round(params / 1e6, 3),
                         variant='optimized' if optimized else 'plain', precision=precision, batch=args.batch,
                         train_img_s=round(rate, 1), epoch_minutes=round(EPOCH / rate / 60, 2), rounds=len(values)))
        print(f"{spec.key:10s} {rows[-1]['variant']:9s} {precision}: {rate:7.1f} img/s, a 60,000-image epoch in "
              f"{rows[-1]['epoch_minutes']:.2f} min", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--steps', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--models', nargs='+', help='study model keys (default: all)')
    parser.add_argument('--out', type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keys = args.models or [spec.key for spec in MODELS]
    rows = []
    for spec in (s for s in MODELS if s.key in keys):
        rows += measure(spec, args)
    write_csv(args.out, rows, list(rows[0]))
    write_json(args.out.with_suffix('.json'), {'machine': describe_machine('cpu'), 'rows': rows,
                                               'command': ' '.join(['python', *sys.argv])})
    return 0


if __name__ == '__main__':
    sys.exit(main())
