"""Threads and loader workers fit the machine: the launcher and the demo override an inherited
OMP_NUM_THREADS that would oversubscribe the cores, and the default loader workers follow the cores."""
import os
import subprocess
import sys

import pytest

import noah_mlp.cli_common as cli_common
from noah_mlp import demo
from noah_mlp.cli_common import cpu_cores, default_loader_workers, threads_per_process
from noah_mlp.errors import UserError
from noah_mlp.train_args import build_parser

from noah_train_helpers import REPO


@pytest.mark.parametrize('cores,nproc,inherited,threads,overridden', [
    (2, 2, '2', 1, True),      # the quick start's case: 2 x 2 threads on 2 cores
    (2, 2, '1', 1, False),
    (2, 1, '2', 2, False),
    (2, 1, None, 2, False),
    (2, 2, None, 1, False),
    (1, 2, None, 1, False),    # never below one thread
    (64, 8, '8', 8, False),    # fits: kept
    (64, 8, '16', 8, True),
    (16, 2, 'lots', 8, True),  # not a number: replaced, and said so
])
def test_threads_per_process(monkeypatch, cores, nproc, inherited, threads, overridden):
    monkeypatch.setattr(cli_common, 'cpu_cores', lambda: cores)
    got, note = threads_per_process(nproc, inherited)
    assert got == threads
    assert (note is not None) == overridden
    if overridden:
        assert f'using {threads} thread(s) per process' in note and '\n' not in note


@pytest.mark.parametrize('cores,local_procs,workers', [(2, 1, 1), (2, 2, 0), (1, 1, 0), (16, 1, 4), (16, 8, 1),
                                                       (96, 8, 4)])
def test_default_loader_workers_fit_the_cores(monkeypatch, cores, local_procs, workers):
    monkeypatch.setattr(cli_common, 'cpu_cores', lambda: cores)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', str(local_procs))
    assert default_loader_workers() == workers
    assert build_parser().parse_args(['--model', 'x']).workers == workers


def test_launcher_overrides_oversubscribing_threads(tmp_path):
    """With OMP_NUM_THREADS inherited at the core count, two launched ranks each run cores // 2 threads."""
    script = tmp_path / 'threads.py'
    # each rank writes its own file: two ranks printing to one pipe can interleave their lines
    script.write_text('import os, sys, torch\n'
                      'open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w").write('
                      'f"threads {torch.get_num_threads()} omp {os.environ[\'OMP_NUM_THREADS\']}")\n')
    cores = cpu_cores()
    env = dict(os.environ, OMP_NUM_THREADS=str(cores), PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, '-m', 'noah_mlp.launch', '--standalone', '--nproc-per-node=2', str(script),
                           str(tmp_path)], capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = max(1, cores // 2)
    seen = [(tmp_path / f'rank{r}').read_text() for r in (0, 1)]
    assert seen == [f'threads {expected} omp {expected}'] * 2
    notes = [line for line in proc.stderr.splitlines() if line.startswith('noah_mlp.launch: ')]
    assert len(notes) == 1 and f'OMP_NUM_THREADS={cores} inherited' in notes[0]


def test_demo_overrides_oversubscribing_threads(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli_common, 'cpu_cores', lambda: 2)
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    seen = {}

    def fake_run(cmd, env=None, **kwargs):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 1, '', '')

    monkeypatch.setattr(demo.subprocess, 'run', fake_run)
    with pytest.raises(UserError, match='demo training failed'):
        demo.run_demo(str(tmp_path), epochs=1, nproc=2, limit=40)
    assert seen['env']['OMP_NUM_THREADS'] == '1'
    assert 'noah_mlp.launch' in seen['cmd']
    assert 'OMP_NUM_THREADS=2 inherited would run 4 threads on 2 core(s)' in capsys.readouterr().out


def test_demo_output_folder_is_git_ignored():
    with open(os.path.join(REPO, '.gitignore')) as f:
        assert 'noah_demo/' in f.read().split()
