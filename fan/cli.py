"""The ``fan`` command line: one sub-command per feature, one set of shared options (:mod:`fan.options`).

Each feature module listed in ``COMMAND_MODULES`` defines ``add_commands(subparsers)``, which adds its
sub-parsers and sets ``func`` (called with the parsed arguments, returning the exit status) as a parser default.
A :class:`~fan.errors.UserError` raised by a command ends it with one line, ``fan <command>: error: <message>``,
and exit status 2; any other exception is a bug and keeps its traceback.
"""
import argparse
import importlib
import sys
from typing import List, Optional

from . import __version__
from .cpu import tune_malloc
from .errors import UserError

COMMAND_MODULES = (
    'fan.zoo',
    'fan.demo',
    'fan.robustness.cli',
    'fan.analysis.cli',
    'fan.ood',
    'fan.finetune',
    'fan.bench.cli',
    'fan.export',
    'fan.train',
    'fan.study.cli',
)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's parser (its sub-parsers too) whose refusal of an option is one line,
    ``fan <command>: error: <message>``, with exit status 2 (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message}\n')


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog='fan', description='Fully Attentional Networks for timm: the model zoo '
                                                             'and its robustness tools.')
    parser.add_argument('--version', action='version', version=f'fan {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()  # the command line's process-wide choice (FAN_TUNE_MALLOC=0 leaves glibc's defaults)
    try:
        return args.func(args) or 0
    except UserError as error:
        print(f'fan {args.command}: error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'fan {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
