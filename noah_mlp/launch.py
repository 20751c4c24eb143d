"""torchrun without the launcher's own traceback: ``python -m noah_mlp.launch [torchrun options] SCRIPT ...``.

Runs torch.distributed.run with the same options. When a worker fails, its message (an
``error: ...`` line, or a bug's traceback) is already on stderr; the launcher then exits with
that worker's exit status instead of adding a traceback of its own. When the launcher is
stopped by a signal it forwards it to the workers (they write a recovery checkpoint) and exits
with 128 + the signal number.

Threads: each worker gets OMP_NUM_THREADS = cores // processes (torch's intra-op threads follow
it), unless an inherited OMP_NUM_THREADS fits the cores; an inherited value that would
oversubscribe them (2 processes x 2 threads on 2 cores) is overridden, with one line on stderr.
"""
import os
import sys
from typing import List, Optional

__all__ = ['main']


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, parse_args, run

    from .cli_common import threads_per_process

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        nproc = determine_local_world_size(args.nproc_per_node)
    except ValueError:
        nproc = 1  # torchrun itself reports the bad value
    threads, note = threads_per_process(nproc, os.environ.get('OMP_NUM_THREADS'))
    os.environ['OMP_NUM_THREADS'] = str(threads)
    if note:
        print(f'noah_mlp.launch: {note}', file=sys.stderr, flush=True)
    try:
        run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        code = failure.exitcode
        return 128 - code if code < 0 else (code or 1)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == '__main__':
    sys.exit(main())
