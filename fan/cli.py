"""The ``fan`` command line: one sub-command per feature.

Each feature module listed in ``COMMAND_MODULES`` defines ``add_commands(subparsers)``, which adds its
sub-parsers and sets ``func`` (called with the parsed arguments) as a parser default.
"""
import argparse
import importlib
import sys
from typing import List, Optional

COMMAND_MODULES = (
    'fan.zoo',
    'fan.demo',
    'fan.robustness.cli',
    'fan.analysis.cli',
    'fan.ood',
    'fan.finetune',
    'fan.bench.cli',
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='fan', description='Fully Attentional Networks for timm.')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
