"""Helpers of the fault-injection tests: run train.py in a subprocess that kills itself inside a chosen write."""
import os
import subprocess
import sys
from typing import List

from noah_train_helpers import REPO

# Runs noah_mlp.train.main with the atomic writer patched: the N-th write whose target is named TARGET
# (any target when TARGET is '*') writes its whole temporary file, then the process SIGKILLs itself
# before the rename, as a kill -9 or a power cut in the middle of saving would.
_KILL_INSIDE_WRITE = '''
import os, signal, sys
import noah_mlp.checkpoint as checkpoint
from noah_mlp.train import main

target, nth = os.environ['NOAH_KILL_WRITE'].rsplit(':', 1)
seen = [0]
real_write = checkpoint._atomic_write

def write_then_die(path, write_fn):
    if target in ('*', os.path.basename(path)):
        seen[0] += 1
        if seen[0] == int(nth):
            def write_and_die(f):
                write_fn(f)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(path, write_and_die)
    return real_write(path, write_fn)

checkpoint._atomic_write = write_then_die
sys.exit(main(sys.argv[1:]))
'''


def train_killed_inside_write(args: List[str], target: str, nth: int, timeout: float = 180):
    """Run training with `args`; the process SIGKILLs itself inside its `nth` write of `target`."""
    env = dict(os.environ, OMP_NUM_THREADS='1', NOAH_KILL_WRITE=f'{target}:{nth}',
               PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    return subprocess.run([sys.executable, '-c', _KILL_INSIDE_WRITE] + args, env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def temp_files(folder: str) -> List[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith('.tmp') or n in ('tmp.pth.tar', 'recovery_tmp.pth.tar'))
