"""Clear errors for the command-line tools.

`UserError` marks a problem with the user's input (a missing folder, an unknown model, a bad
checkpoint). `cli_main` runs a tool's main function and turns such an error into one line,
``error: <message>`` on stderr, and exit status 2, without a traceback. Every other exception is
a bug and keeps its traceback.
"""
import os
import sys
from typing import Callable, Optional

__all__ = ['UserError', 'cli_main', 'EXIT_USER_ERROR', 'EXIT_STOPPED']

EXIT_USER_ERROR = 2
EXIT_STOPPED = 3  # stopped by a signal after writing a recovery checkpoint

_WRAPPED = 'Original Traceback'


class UserError(Exception):
    """A problem with the input that the user can fix; reported as one line, no traceback."""

    all_ranks = True  # raised the same way by every process of a distributed run

    def __init__(self, message: str = '') -> None:
        message = str(message)
        if _WRAPPED in message:
            self.all_ranks = False  # from one process's data (a DataLoader worker): print it where it happened
            # Re-raised by a DataLoader worker: torch wraps our message in the worker's traceback.
            # Keep only what we said ("...UserError: <message>" is the traceback's tail).
            tail = message.rsplit('UserError: ', 1)
            if len(tail) == 2:
                message = tail[1].strip()
        super().__init__(message)


def _is_primary() -> bool:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # pragma: no cover - a broken backend must not hide the message
        pass
    return int(os.environ.get('RANK', '0')) == 0


def cli_main(fn: Callable[[], Optional[int]]) -> int:
    """Run `fn`, turning a UserError into ``error: ...`` and a non-zero exit status.

    In a multi-process run an error raised the same way by every rank (bad arguments, a missing
    folder) is printed by rank 0 only; an error only one rank can see (an unreadable image in its
    shard) is printed by the rank that hit it, marked with its rank.
    """
    try:
        return fn() or 0
    except UserError as e:
        shared = e.all_ranks
        world = int(os.environ.get('WORLD_SIZE', '1'))
        if world <= 1:
            print(f'error: {e}', file=sys.stderr, flush=True)
        elif shared:
            if _is_primary():
                print(f'error: {e}', file=sys.stderr, flush=True)
        else:
            print(f'error (rank {os.environ.get("RANK", "?")}): {e}', file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr, flush=True)
        return 130
