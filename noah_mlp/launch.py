"""torchrun without the launcher's own traceback: ``python -m noah_mlp.launch [torchrun options] SCRIPT ...``.

Runs torch.distributed.run with the same options. When a worker fails, its message (an
``error: ...`` line, or a bug's traceback) is already on stderr; the launcher then exits with
that worker's exit status instead of adding a traceback of its own. When the launcher is
stopped by a signal it forwards it to the workers (they write a recovery checkpoint) and exits
with 128 + the signal number.

Threads: each worker gets OMP_NUM_THREADS = cores // processes (torch's intra-op threads follow
it), unless an inherited OMP_NUM_THREADS fits the cores; an inherited value that would
oversubscribe them (2 processes x 2 threads on 2 cores) is overridden, with one line on stderr.

Also: `launch_command` rebuilds the command that started this process (for the printed resume
command), and `stop_when_launcher_dies` makes a torchrun worker stop (recovery checkpoint, exit)
when its launcher is killed outright.
"""
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from typing import List, Optional, Tuple

__all__ = ['main', 'launch_command', 'stop_when_launcher_dies']

# The shell-quoted command that launched the workers, up to and including the training script
# (set by distributed_train.sh and by this launcher, read back by `launch_command`).
LAUNCH_ENV = 'NOAH_MLP_LAUNCH'


def _python() -> str:
    """'python' when that name runs this interpreter, else this interpreter's path."""
    found = shutil.which('python')
    if found and os.path.realpath(found) == os.path.realpath(sys.executable):
        return 'python'
    return sys.executable


def _script_command(argv0: str) -> Tuple[List[str], bool]:
    """How this script was started: ``-m noah_mlp.train``, a console script on PATH (e.g. noah-train)
    or a path to a script. Returns the words and whether they are a console script (run without python)."""
    from . import train as train_module
    if os.path.abspath(argv0) == os.path.abspath(train_module.__file__):
        return ['-m', 'noah_mlp.train'], False
    name = os.path.basename(argv0)
    on_path = shutil.which(name) if os.sep in argv0 or name == argv0 else None
    if on_path and not name.endswith('.py') and os.path.realpath(on_path) == os.path.realpath(argv0):
        return [name], True
    return [os.path.abspath(argv0)], False


def launch_command(argv0: Optional[str] = None, environ=None) -> str:
    """The command (without the training arguments) that started this process, as a user types it
    (shell-quoted).

    A launcher that recorded itself (distributed_train.sh, ``python -m noah_mlp.launch``) is
    repeated as given, node and rendezvous options included, so a resumed run has the same
    processes and global batch. A plain torchrun is rebuilt from its environment (processes per
    node, nodes, node rank, master address); a single process from ``sys.argv[0]``.
    """
    env = os.environ if environ is None else environ
    argv0 = sys.argv[0] if argv0 is None else argv0
    if env.get(LAUNCH_ENV):
        return env[LAUNCH_ENV].strip()
    script, console = _script_command(argv0)
    if 'TORCHELASTIC_RUN_ID' not in env and int(env.get('WORLD_SIZE', '1')) <= 1:
        return shlex.join(script if console else [_python()] + script)
    world = int(env.get('WORLD_SIZE', '1'))
    per_node = int(env.get('LOCAL_WORLD_SIZE', world))
    nnodes = int(env.get('GROUP_WORLD_SIZE', max(1, world // max(per_node, 1))))
    cmd = ['torchrun', f'--nproc-per-node={per_node}']
    if nnodes > 1:
        cmd += [f'--nnodes={nnodes}', f"--node-rank={env.get('GROUP_RANK', '0')}",
                f"--master-addr={env.get('MASTER_ADDR', '127.0.0.1')}", f"--master-port={env.get('MASTER_PORT', '29500')}"]
    else:
        cmd += ['--standalone']
    return shlex.join(cmd + (['--no-python'] if console else []) + script)


def stop_when_launcher_dies(grace_s: float = 120.) -> None:
    """Under torchrun: if the launcher disappears (kill -9), SIGTERM this process (it saves a recovery
    checkpoint and exits); should that not end it within `grace_s` (a peer gone in a collective), SIGKILL."""
    if 'TORCHELASTIC_RUN_ID' not in os.environ:
        return
    launcher = os.getppid()

    def _watch() -> None:
        while os.getppid() == launcher:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=_watch, name='noah-launcher-watch', daemon=True).start()


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, parse_args, run

    from .cli_common import threads_per_process

    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if not os.environ.get(LAUNCH_ENV):
        head = raw[:len(raw) - len(args.training_script_args)]
        os.environ[LAUNCH_ENV] = shlex.join([_python(), '-m', 'noah_mlp.launch'] + head)
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
