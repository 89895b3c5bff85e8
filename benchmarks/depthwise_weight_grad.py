"""Depthwise conv weight gradient on the CPU: oneDNN's (autograd's ``convolution_backward``) against
``fan.cpu.FastDepthwiseConv2d``'s swapped forward conv, on channels-last maps of batch 16 (the FAN-Hybrid ConvNeXt
stages' 7x7 kernels, and 3x3 mixer maps for comparison).

    python benchmarks/depthwise_weight_grad.py --out depthwise_weight_grad.csv

Each row: the shape, the median milliseconds of each way (weight and bias gradients; the swapped way with its copies
to planar layout), and the largest difference between the two gradients relative to the largest gradient value.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fan.cpu import tune_malloc
from fan.cpu.kernels import depthwise_weight_grad
from fan.io import write_csv

SHAPES = [(128, 56, 7), (256, 28, 7), (768, 14, 3), (384, 56, 3)]  # (channels, map side, kernel)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_malloc()
    rows = []
    for channels, side, kernel in SHAPES:
        shape = (args.batch, channels, side, side)
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(channels, 1, kernel, kernel)
        grad_out = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        geometry = ([channels], [1, 1], [kernel // 2] * 2, [1, 1], False, [0, 0], channels)

        def onednn():
            return torch.ops.aten.convolution_backward(grad_out, x, weight, *geometry, [False, True, True])[1]

        def swapped():
            grad_out.sum((0, 2, 3))  # (the bias gradient, which oneDNN's call computes too)
            return depthwise_weight_grad(x, grad_out, kernel)

        onednn_ms, swapped_ms = median_ms(onednn, args.repeats), median_ms(swapped, args.repeats)
        want, got = onednn(), swapped()
        rows.append({
            'batch': args.batch, 'channels': channels, 'side': side, 'kernel': kernel, 'threads': args.threads,
            'onednn_ms': round(onednn_ms, 2), 'swapped_ms': round(swapped_ms, 2),
            'speedup': round(onednn_ms / swapped_ms, 2),
            'max_rel_diff': float((got - want).abs().max() / want.abs().max()),
            'torch': torch.__version__,
        })
        print(rows[-1], flush=True)
    write_csv(args.out, rows, list(rows[0]))


if __name__ == '__main__':
    main()
