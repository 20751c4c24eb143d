"""benchmarks/gpu_check.py: its CPU smoke mode runs clean, its checks fail when the code is wrong, and
its table of the package's CUDA branches stays complete."""
import importlib.util
import io
import json
import os
import subprocess
import sys
import tokenize

import pytest
import torch

import noah_mlp.head as head_mod
from noah_train_helpers import REPO

SCRIPT = os.path.join(REPO, 'benchmarks', 'gpu_check.py')


@pytest.fixture(scope='module')
def gpu_check():
    spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_runs_every_check_on_cpu(tmp_path):
    out = tmp_path / 'results.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run([sys.executable, SCRIPT, '--smoke', '--json', str(out)], capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())['rows']
    assert not [r for r in rows if r['status'] == 'FAIL']
    passed = {}
    for r in rows:
        if r['status'] == 'PASS':
            passed.setdefault(r['check'], []).append(r['item'])
    assert len([i for i in passed['formula'] if 'head families' in i]) == 3  # fp32, bf16, fp16
    assert len([i for i in passed['formula'] if 'dropout' in i]) == 6  # 3 dtypes x 2 head layouts
    assert len(passed['sdpa']) == 7  # 3 dtypes x dropout on/off, broadcast queries
    assert [i for i in passed['train'] if i.startswith('validate.py')] == [
        'validate.py --use-ema after "distributed_train.sh 2 (gloo) + bf16 amp + channels-last + EMA"']
    skipped = ' '.join(r['item'] + r['detail'] for r in rows if r['status'] == 'SKIP')
    assert 'CUDA' in skipped and '--torchcompile' in skipped  # what it could not run, it says
    perf = [r for r in rows if r['check'] == 'perf' and r['status'] == 'INFO']
    assert any('head alone' in r['item'] for r in perf) and any('train.py loop' in r['item'] for r in perf)
    assert 'gpu_check: ' in proc.stdout and ' 0 failed' in proc.stdout


def test_formula_check_fails_on_a_wrong_head(gpu_check, monkeypatch):
    real = head_mod.class_attention
    monkeypatch.setattr(head_mod, 'class_attention', lambda *a, **kw: real(*a, **kw) * 1.001)
    rep = gpu_check.Report()
    gpu_check.check_formula(rep, torch.device('cpu'), smoke=True)
    fp32 = [r for r in rep.rows if r['item'].startswith('fp32')]
    assert fp32[0]['status'] == 'FAIL' and 'failing: C=16 N=1' in fp32[0]['detail']
    assert rep.exit_status() == 1


def test_dropout_statistics_check_fails_on_biased_dropout(gpu_check, monkeypatch):
    real = head_mod.class_attention
    monkeypatch.setattr(head_mod, 'class_attention',
                        lambda q, k, v, dropout_p=0., **kw: real(q, k, v, dropout_p, **kw) * (1 - dropout_p / 2))
    rep = gpu_check.Report()
    gpu_check.check_dropout_statistics(rep, torch.device('cpu'), 'fp32', True, True)
    assert rep.rows[0]['status'] == 'FAIL'


def test_sdpa_check_fails_on_the_math_fallback(gpu_check, monkeypatch):
    """CPU fp32 training with dropout must run NOAH's chunked kernel, not SDPA's materialising math backend."""
    monkeypatch.setattr(head_mod, '_chunked_path_applies', lambda x: False)
    rep = gpu_check.Report()
    gpu_check.check_sdpa(rep, torch.device('cpu'), smoke=True)
    failed = [r for r in rep.rows if r['status'] == 'FAIL']
    assert len(failed) == 1 and 'fp32, dropout 0.1' in failed[0]['item'] and 'backend math' in failed[0]['detail']


def test_every_cuda_branch_of_the_package_is_listed(gpu_check):
    hits = []
    root = os.path.join(REPO, 'noah_mlp')
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith('.py'):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                source = f.read()
            lines = source.splitlines()
            rel = os.path.relpath(path, REPO).replace(os.sep, '/')
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                code_name = tok.type == tokenize.NAME and gpu_check.CUDA_PATTERNS.search(tok.string)
                cuda_literal = tok.type == tokenize.STRING and tok.string.strip('\'"') == 'cuda'
                if code_name or cuda_literal:
                    hits.append((rel, tok.start[0], lines[tok.start[0] - 1].strip()))
    assert hits, 'the package has no CUDA branch at all?'
    unlisted = [h for h in hits if not any(module == h[0] and text in h[2]
                                           for module, text, _ in gpu_check.CUDA_BRANCHES)]
    assert not unlisted, f'CUDA branches missing from gpu_check.CUDA_BRANCHES: {unlisted}'
    stale = [b for b in gpu_check.CUDA_BRANCHES if not any(b[0] == h[0] and b[1] in h[2] for h in hits)]
    assert not stale, f'CUDA_BRANCHES entries that match no code line: {stale}'
    for module, text, check in gpu_check.CUDA_BRANCHES:
        assert f'{module}: {text!r} -> {check}' in gpu_check.__doc__
