"""Run a function in a fresh child process and return its result: one measurement per process.

Children are forked from a multiprocessing fork server that has imported torch, timm and the FAN models once
(``fan.bench.measure``), so a child starts in about a second instead of re-importing torch, and its peak resident
memory starts from the server's (see ``fan.bench.memory.PeakMemory``). The server has run no tensor code, so
forking it is safe for OpenMP and CUDA.
"""
import multiprocessing
import os
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

__all__ = ['ChildError', 'run_in_child']

_PRELOAD = ['fan.bench.measure']


class ChildError(RuntimeError):
    """The function raised in the child (message ``'ExcType: text'``), or the child died; ``details`` holds the
    child's traceback when there is one."""

    def __init__(self, message: str, details: str = '') -> None:
        super().__init__(message)
        self.details = details


def _context() -> multiprocessing.context.BaseContext:
    if 'forkserver' not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context('spawn')
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload(_PRELOAD)  # takes effect if this process has not started its server yet
    return context


def _exit_with_parent() -> None:
    """Watchdog thread of a child: end the child as soon as its parent process ends (killed by any signal)."""
    multiprocessing.parent_process().join()
    os._exit(1)


def _child_main(sender: Connection, fn: Callable[..., Any], args: tuple) -> None:
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    try:
        sender.send(('ok', fn(*args)))
    except BaseException as e:  # report everything, KeyboardInterrupt included, to the parent
        sender.send(('error', f'{type(e).__name__}: {e}', traceback.format_exc()))
    finally:
        sender.close()


def run_in_child(fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None) -> Any:
    """``fn(*args)`` in a new child process (``fn`` and ``args`` must be picklable; ``fn`` importable).

    Raises :class:`ChildError` when ``fn`` raises or the child dies (e.g. killed for memory), ``TimeoutError`` after
    ``timeout`` seconds (the child is terminated). The child ends when the parent is interrupted or killed.
    """
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(sender, fn, args), name=f'fan-bench-{fn.__name__}')
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise TimeoutError(f'{fn.__name__} gave no result within {timeout:g} s; the child was stopped')
        try:
            status, *payload = receiver.recv()
        except EOFError:
            process.join()
            raise ChildError(f'the child process died without a result (exit code {process.exitcode}; '
                             f'out of memory?)') from None
    except BaseException:
        process.terminate()
        raise
    finally:
        process.join()
        receiver.close()
    if status == 'error':
        raise ChildError(*payload)
    return payload[0]
