"""One measurement in a fresh process, for benchmarks/vs_official.py: throughput and peak memory of one model.

    python rate_child.py ours|official MODEL --batch 16 --threads 2 --seconds 4 [--precision bf16|paired] [--compile]

``official`` imports the official implementation from ``$OFFICIAL_FAN_DIR`` (its ``models/`` registers the FAN
models with the timm it was written for, 0.5.4); ``ours`` imports fan. Prints one JSON line: inference and
training-step images per second (timed for at least ``--seconds`` each after a warm-up step), the process's peak
resident memory, and the fp32 / bf16 matrix-multiply rate of this process (GMAC/s), the machine's ceiling.
Runs under the official environment too, so it uses nothing newer than torch and timm 0.5.4 offer.

``--precision paired`` (inference only): float32 and bfloat16-autocast batches alternate in this one process, and the
speed-up is the median over pairs of the float32 batch's time over the bfloat16 one's. Both precisions see the same
moment's load, which separate processes on a shared machine do not (their bf16 / fp32 ratio swung 1.18-2.16 between
rounds of one run on the project's Zen 5 machine).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Dict

import torch


def matmul_gmacs(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """Multiply-adds per second (G) of square matrix products: the ceiling a model's matmuls can reach. The faster of
    torch's two CPU libraries for them, MKL (``a @ b``, what ``F.linear`` calls) and oneDNN (its linear, which fan's
    layers call): on AMD CPUs MKL stays on its AVX2 kernels (66-98 against oneDNN's 160-205 GMAC/s in float32 on a
    Zen 5 machine), so MKL's rate alone is no ceiling there."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    products = [lambda: a @ b]
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise'):
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, 'none', [], ''))
    best = 0.
    for product in products:
        product()
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / len(products):
            product()
            count += 1
        best = max(best, count * size ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def rate(step, batch: int, seconds: float) -> float:
    step()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or count < 2:
        step()
        count += 1
    return count * batch / (time.perf_counter() - start)


def paired_rates(fp32_step, bf16_step, batch: int, seconds: float) -> Dict[str, float]:
    """Float32 and bfloat16 batches taking turns for about ``seconds`` (``fan.bench.throughput.time_interleaved``):
    images per second of each from its median batch time, and the median of the pairs' time ratios."""
    from fan.bench.throughput import time_interleaved

    start = time.perf_counter()
    fp32_step(), bf16_step()
    repeats = max(3, int(seconds / (time.perf_counter() - start)))
    fp32_times, bf16_times = time_interleaved([fp32_step, bf16_step], 1, repeats, lambda: None)
    return {'fp32_infer_img_s': batch / statistics.median(fp32_times),
            'bf16_infer_img_s': batch / statistics.median(bf16_times),
            'bf16_over_fp32': statistics.median(f / b for f, b in zip(fp32_times, bf16_times)),
            'pairs': repeats}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('impl', choices=('ours', 'official'))
    parser.add_argument('model')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--seconds', type=float, default=4.0)
    parser.add_argument('--precision', choices=('fp32', 'bf16', 'paired'), default='fp32',
                        help='paired: fp32 and bf16 inference batches alternating in this process')
    parser.add_argument('--compile', action='store_true', help='torch.compile (inference only)')
    parser.add_argument('--no-train', action='store_true')
    parser.add_argument('--optimize', action='store_true', help='ours: fan.optimize (the CPU fast modules)')
    parser.add_argument('--tune-malloc', action='store_true', help="ours: fan.tune_malloc() (glibc's malloc settings)")
    args = parser.parse_args()
    if args.precision == 'paired' and args.compile:
        parser.error('--precision paired measures eager inference; leave out --compile')
    torch.set_num_threads(args.threads)
    if args.impl == 'official':
        sys.path.insert(0, os.environ['OFFICIAL_FAN_DIR'])
        import models  # noqa: F401  (registers the official FAN models with timm 0.5.4)
    else:
        import fan
        if args.tune_malloc:
            fan.tune_malloc()
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model)
    if args.optimize:
        fan.optimize(model)
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))
    autocast = (lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if args.precision == 'bf16' else \
        (lambda: torch.autocast('cpu', enabled=False))
    runner = torch.compile(model) if args.compile else model

    def infer_step() -> None:
        with torch.inference_mode(), autocast():
            runner(x)

    def bf16_infer_step() -> None:
        with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
            runner(x)

    model.eval()
    result = {'impl': args.impl, 'model': args.model, 'batch': args.batch, 'threads': args.threads,
              'precision': args.precision, 'compile': args.compile, 'optimize': args.optimize,
              'tune_malloc': args.tune_malloc, 'torch': torch.__version__,
              'timm': timm.__version__}
    start = time.perf_counter()
    infer_step()
    result['first_step_s'] = time.perf_counter() - start  # includes compilation with --compile
    if args.precision == 'paired':
        result.update(paired_rates(infer_step, bf16_infer_step, args.batch, 2 * args.seconds))
    else:
        result['infer_img_s'] = rate(infer_step, args.batch, args.seconds)
    if not args.no_train and args.precision != 'paired':
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def train_step() -> None:
            optimizer.zero_grad()
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            optimizer.step()

        result['train_img_s'] = rate(train_step, args.batch, args.seconds * 1.5)
    result['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result['matmul_fp32_gmacs'] = matmul_gmacs(torch.float32)
    result['matmul_bf16_gmacs'] = matmul_gmacs(torch.bfloat16)
    print(json.dumps(result))


if __name__ == '__main__':
    main()
