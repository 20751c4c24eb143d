"""torchrun without the launcher's own traceback: ``python -m noah_mlp.launch [torchrun options] SCRIPT ...``.

Runs torch.distributed.run with the same options. When a worker fails, its message (an
``error: ...`` line, or a bug's traceback) is already on stderr; the launcher then exits with
that worker's exit status instead of adding a traceback of its own. When the launcher is
stopped by a signal it forwards it to the workers (they write a recovery checkpoint) and exits
with 128 + the signal number. Sets OMP_NUM_THREADS to cores / processes when it is unset.
"""
import os
import sys
from typing import List, Optional

__all__ = ['main']


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if 'OMP_NUM_THREADS' not in os.environ:
        try:
            nproc = int(args.nproc_per_node)
        except (TypeError, ValueError):
            nproc = 1
        os.environ['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // max(nproc, 1)))
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
