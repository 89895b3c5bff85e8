"""Training speed of a micro FAN on Fashion-MNIST-sized inputs: can one 60,000-image epoch fit in 3 minutes on the
project's 2 CPU cores?

    python benchmarks/fashion_mnist_speed.py --out benchmarks/results/fashion_mnist_speed_zen4.csv

A FAN-ViT with the patch-4 stem (``--model-kwargs``-style arguments below; 1-channel 28 px images, 10 classes),
trained on in-memory random tensors (the model's compute is what costs, not the loader) with AdamW and
cross-entropy, plain and after ``fan.optimize``, in float32 and under bfloat16 autocast. Each variant runs in this
one process, the variants alternating over ``--rounds`` rounds of ``--steps`` timed steps; the row gives the median
images/s and the epoch time it implies.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fan  # noqa: E402
from fan.bench.runner import describe_machine  # noqa: E402
from fan.io import write_csv, write_json  # noqa: E402

MODEL = 'fan_tiny_12_p16_224'
MICRO = dict(patch_size=4, img_size=28, in_chans=1, embed_dim=128, depth=6, num_heads=4, num_classes=10)
EPOCH = 60_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--steps', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--out', type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, labels = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    variants = {}
    for optimized in (False, True):
        for precision in ('fp32', 'bf16'):
            model = fan.create_model(MODEL, optimize=optimized, **MICRO).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            variants[(optimized, precision)] = (model, optimizer)
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
        rows.append(dict(model=f'{MODEL} {MICRO}', params_m=round(params / 1e6, 3), variant='optimized' if optimized
                         else 'plain', precision=precision, batch=args.batch, train_img_s=round(rate, 1),
                         epoch_minutes=round(EPOCH / rate / 60, 2), rounds=len(values)))
        print(f"{rows[-1]['variant']:9s} {precision}: {rate:7.1f} img/s, a 60,000-image epoch in "
              f"{rows[-1]['epoch_minutes']:.2f} min")
    write_csv(args.out, rows, list(rows[0]))
    write_json(args.out.with_suffix('.json'), {'machine': describe_machine('cpu'), 'rows': rows,
                                               'command': ' '.join(['python', *sys.argv])})
    return 0


if __name__ == '__main__':
    sys.exit(main())
