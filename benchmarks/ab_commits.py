"""Two commits of fan against each other: the same measurement as vs_official.py, ours against ours.

Each commit is checked out in a temporary git worktree and imported from there (``PYTHONPATH``) by fresh
``rate_child.py`` processes of the project's Python; the two commits alternate, each round starting with the other
one, so both see the same background load. For a change's before / after figures on this noisy machine.

    python benchmarks/ab_commits.py OLD NEW [fan_tiny_12_p16_224 ...] [--rounds 3] [--precision bf16] [--no-train]
        --out training_change_ab.csv

Writes one CSV row per process (round, model, commit, rates, the process's matrix-multiply rates) and prints the
medians and their ratio per model.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vs_official import DEFAULT_MODELS, run_child  # noqa: E402
from fan.io import write_csv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('old')
    parser.add_argument('new')
    parser.add_argument('models', nargs='*', default=list(DEFAULT_MODELS))
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--seconds', type=float, default=4.0)
    parser.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32')
    parser.add_argument('--no-train', action='store_true')
    parser.add_argument('--timeout', type=float, default=900)
    parser.add_argument('--out', type=Path, required=True)
    args = parser.parse_args()
    extra = ['--precision', args.precision] + (['--no-train'] if args.no_train else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for rev in (args.old, args.new):
            trees[rev] = Path(tmp) / rev.replace('/', '_')
            subprocess.run(['git', 'worktree', 'add', '--detach', '-q', str(trees[rev]), rev], cwd=ROOT, check=True)
        try:
            for r in range(args.rounds):
                for model in args.models:
                    for rev in ((args.old, args.new) if r % 2 == 0 else (args.new, args.old)):
                        env = dict(os.environ, PYTHONPATH=str(trees[rev]))
                        result = run_child(sys.executable, 'ours', model, args, env, extra)
                        rows.append({'round': r + 1, 'model': model, 'commit': rev, 'precision': args.precision,
                                     'infer_img_s': round(result['infer_img_s'], 2),
                                     'train_img_s': round(result.get('train_img_s', float('nan')), 2),
                                     'matmul_fp32_gmacs': round(result['matmul_fp32_gmacs'], 1)})
                        print(rows[-1], flush=True)
                        write_csv(args.out, rows, list(rows[0]))
        finally:
            for tree in trees.values():
                subprocess.run(['git', 'worktree', 'remove', '--force', str(tree)], cwd=ROOT)
    for model in args.models:
        for key in ('infer_img_s',) + (() if args.no_train else ('train_img_s',)):
            old, new = (statistics.median(row[key] for row in rows if row['model'] == model and row['commit'] == rev)
                        for rev in (args.old, args.new))
            print(f'{model} {key}: {args.old} {old:.2f} -> {args.new} {new:.2f} ({new / old:.3f}x)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
