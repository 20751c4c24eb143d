"""Fault injection, signals and launchers: SIGTERM to the process group with loader workers, kill -9 of the
launcher, and the printed resume command for every way of starting a run."""
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from noah_mlp.checkpoint import safe_load
from noah_mlp.launch import launch_command

from noah_train_helpers import FAST, REPO, TINY, make_image_folder

TRAIN_PY = os.path.join(REPO, 'train.py')
DIST_SH = os.path.join(REPO, 'distributed_train.sh')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp('data')))


def _start(cmd, log_dir, **env_extra):
    """Start `cmd` in its own process group, stdout / stderr to files (nothing can block on a full pipe)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **env_extra)
    env.pop('NOAH_MLP_LAUNCH', None)
    out, err = open(os.path.join(log_dir, 'out.log'), 'w'), open(os.path.join(log_dir, 'err.log'), 'w')
    return subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=REPO, start_new_session=True)


def _read(log_dir, name='out.log'):
    with open(os.path.join(log_dir, name)) as f:
        return f.read()


def _wait_for(proc, log_dir, text, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in _read(log_dir):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f'no {text!r} in the log:\n{_read(log_dir)[-3000:]}\n{_read(log_dir, "err.log")[-3000:]}')


def _finish(proc, timeout=120):
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _recovery_from_hint(err):
    hints = [line for line in err.splitlines() if line.startswith('To resume: ')]
    assert len(hints) == 1, err
    return hints[0][len('To resume: '):], re.search(r'--resume (\S+)$', hints[0]).group(1)


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize('nproc', [1, 2])
def test_sigterm_to_the_process_group_with_loader_workers(data, tmp_path, nproc):
    """What Slurm preemption, scancel and systemd do: SIGTERM to every process, loader workers included.
    The workers keep serving until the step ends; a recovery checkpoint is written; exit 128 + 15.
    With 2 processes, launched with torchrun node options and $TORCHRUN_ARGS, the printed resume
    command repeats them (same processes, same global batch)."""
    out = str(tmp_path / 'out')
    args = [data] + TINY + FAST + ['--workers', '2', '--epochs', '100', '--output', out, '--experiment', 'pg',
                                   '--log-interval', '1']
    env = {}
    if nproc == 1:
        cmd = [sys.executable, TRAIN_PY] + args
    else:
        node_options = ['--nnodes', '1', '--node-rank', '0', '--master-addr', '127.0.0.1', '--master-port',
                        str(_free_port())]
        cmd = ['bash', DIST_SH, str(nproc)] + node_options + args
        env = dict(TORCHRUN_ARGS='--max-restarts 0')
    proc = _start(cmd, str(tmp_path), **env)
    try:
        _wait_for(proc, str(tmp_path), 'Train: epoch 0 [2/')
        os.killpg(proc.pid, signal.SIGTERM)
    finally:
        code = _finish(proc)
    err = _read(str(tmp_path), 'err.log')
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert 'Traceback' not in err and 'killed by signal' not in err
    command, recovery = _recovery_from_hint(err)
    assert re.fullmatch(r'recovery-\d+-\d+\.pth\.tar', os.path.basename(recovery))
    assert safe_load(recovery)['recovery'] is True
    if nproc == 2:
        typed = ' '.join(shlex.quote(a) for a in cmd[1:len(cmd) - len(args)])
        assert command.startswith(f'TORCHRUN_ARGS=--max-restarts\\ 0 bash {typed} {data} '), command


def _children(pid):
    kids = []
    for tid in os.listdir(f'/proc/{pid}/task'):
        with open(f'/proc/{pid}/task/{tid}/children') as f:
            kids += [int(k) for k in f.read().split()]
    return kids


def _alive(pid):
    try:
        with open(f'/proc/{pid}/status') as f:
            return not re.search(r'^State:\s+Z', f.read(), re.M)  # a zombie has exited
    except FileNotFoundError:
        return False


def test_ranks_stop_when_the_launcher_is_killed(data, tmp_path):
    """kill -9 of distributed_train.sh's launcher: both ranks notice within a second, write a recovery
    checkpoint and exit, instead of training on as orphans."""
    out = str(tmp_path / 'out')
    proc = _start(['bash', DIST_SH, '2', data] + TINY + FAST + [
        '--epochs', '100', '--output', out, '--experiment', 'orphan', '--log-interval', '1'], str(tmp_path))
    try:
        _wait_for(proc, str(tmp_path), 'Train: epoch 0 [2/')
        ranks = _children(proc.pid)
        assert len(ranks) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 60
        while time.time() < deadline and any(_alive(r) for r in ranks):
            time.sleep(0.2)
        assert not any(_alive(r) for r in ranks), 'ranks still training after the launcher died'
    finally:
        for pid in _children(proc.pid) if _alive(proc.pid) else []:
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL) if _alive(proc.pid) else None
    recoveries = [n for n in os.listdir(os.path.join(out, 'orphan')) if n.startswith('recovery-')]
    assert recoveries and safe_load(os.path.join(out, 'orphan', recoveries[0]))['recovery'] is True


# ------------------------------------------------------------------------------------------ resume command
def test_resume_command_of_each_way_to_start_a_run():
    env = {'PATH': os.environ['PATH']}
    python = 'python' if shutil.which('python') and os.path.realpath(shutil.which('python')) == \
        os.path.realpath(sys.executable) else sys.executable
    module_file = os.path.join(REPO, 'noah_mlp', 'train.py')
    # python train.py / a path to the script: the script's absolute path, so it runs from any folder
    assert launch_command('train.py', env) == shlex.join([python, os.path.abspath('train.py')])
    assert launch_command(TRAIN_PY, env) == shlex.join([python, TRAIN_PY])
    # python -m noah_mlp.train (argv[0] is the module's file)
    assert launch_command(module_file, env) == f'{shlex.quote(python)} -m noah_mlp.train'
    # the noah-train console script
    console = shutil.which('noah-train')
    assert console, 'noah-train is installed with the package'
    assert launch_command(console, env) == 'noah-train'
    # plain torchrun, two nodes of 8: rebuilt from torchrun's environment with the node options
    torchrun_env = dict(env, TORCHELASTIC_RUN_ID='x', WORLD_SIZE='16', LOCAL_WORLD_SIZE='8', GROUP_WORLD_SIZE='2',
                        GROUP_RANK='0', MASTER_ADDR='10.0.0.1', MASTER_PORT='29500')
    assert launch_command(TRAIN_PY, torchrun_env) == (
        f'torchrun --nproc-per-node=8 --nnodes=2 --node-rank=0 --master-addr=10.0.0.1 --master-port=29500 {TRAIN_PY}')
    assert launch_command(module_file, dict(torchrun_env, WORLD_SIZE='8', GROUP_WORLD_SIZE='1')) == \
        'torchrun --nproc-per-node=8 --standalone -m noah_mlp.train'
    # a launcher that recorded itself is repeated as typed
    assert launch_command(TRAIN_PY, dict(env, NOAH_MLP_LAUNCH='bash distributed_train.sh 8 --nnodes 2 ')) == \
        'bash distributed_train.sh 8 --nnodes 2'


def _stopped_run(cmd, log_dir, **env_extra):
    """Start a run, SIGTERM it at its first step; returns its printed resume command and recovery path."""
    proc = _start(cmd, log_dir, **env_extra)
    try:
        _wait_for(proc, log_dir, 'Train: epoch 0 [1/')
        os.kill(proc.pid, signal.SIGTERM)
    finally:
        assert _finish(proc) == 128 + signal.SIGTERM
    return _recovery_from_hint(_read(log_dir, 'err.log'))


def test_printed_resume_command_of_python_m_runs(data, tmp_path):
    """`python -m noah_mlp.train`, stopped: the printed command, pasted into a shell elsewhere, resumes."""
    out = str(tmp_path / 'out')
    command, recovery = _stopped_run([sys.executable, '-m', 'noah_mlp.train', data] + TINY + FAST + [
        '--epochs', '100', '--output', out, '--experiment', 'mod', '--log-interval', '1'], str(tmp_path))
    assert re.match(r'\S*python\S* -m noah_mlp\.train ', command), command
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    again = subprocess.Popen(['bash', '-c', command], cwd=str(elsewhere), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1'))
    try:
        first = next((line for line in again.stdout if line.startswith(('Resumed from', 'Train:'))), '')
    finally:
        os.killpg(again.pid, signal.SIGKILL)
        again.wait()
    assert first.startswith(f"Resumed from '{recovery}'"), first
