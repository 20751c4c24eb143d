"""Every fenced ```python and ```bash block of README.md runs as pasted, with small stand-ins.

Stand-ins are files the test writes at the paths the README names (an ImageNet-style folder, the
checkpoints, the images), plus the explicit substitutions below, each with its reason. A block that
cannot run is listed in NOT_RUN with the reason; every other block runs, in a fresh temporary folder
holding the stand-ins and links to the repository's scripts, as its own subprocess.
"""
import argparse
import os
import re
import socket
import subprocess
import sys
from typing import List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from noah_train_helpers import REPO, make_image_folder

README = os.path.join(REPO, 'README.md')

# Files the README names, written by the test at exactly that path (relative to the folder a block runs in).
STAND_INS = {
    'datasets/ILSVRC2012': 'ImageNet: a 3-class ImageFolder of 16 px images (train/ and val/)',
    'datasets/flowers': 'a fine-tuning dataset: the same 3-class folder',
    'noah_gmlp_ti16.pth.tar': 'a noah_gmlp_ti16_224 training checkpoint (1000 classes, with EMA), random weights',
    'model_best.pth.tar': 'the same checkpoint, as a run of train.py would name it',
    'output/train/exp/model_best.pth.tar': 'the same checkpoint, at the README path of a finished run',
    'cat.jpg': 'a generated 64 px photo stand-in',
    'dog.jpg': 'a generated 64 px photo stand-in',
}

# (text in the README, what runs instead, why): sizes and counts a 2-core CPU test can afford
TINY_TRAIN = ('--epochs 1 -b 8 --workers 0 --img-size 16 --log-interval 1 '
              '--model-kwargs num_blocks=2 embed_dim=32 patch_size=4')
SUBSTITUTIONS: List[Tuple[str, str, str]] = [
    ('{ngpus}', '1', 'template placeholder: one process'),
    ('{path to dataset}', './datasets/ILSVRC2012', 'template placeholder: the stand-in dataset'),
    ('{model name}', 'noah_gmlp_ti16_224', 'template placeholder: a model name'),
    (' [--amp]', '', 'template placeholder: an optional flag'),
    ('distributed_train.sh 8 ', 'distributed_train.sh 1 ', 'one process instead of 8 GPUs (multi-process runs: test_train.py)'),
    ('--config configs/default_noah.yaml', '--config configs/default_noah.yaml ' + TINY_TRAIN,
     'the recipe, but 1 epoch of a 2-block 16 px model (flags after --config override it)'),
    ('--nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500',
     '--nnodes 1 --node-rank 0 --master-addr 127.0.0.1 --master-port {port}',
     'one machine: node 0 of a 1-node rendezvous on a free local port'),
    ('--model noah_resnet50 -b 32', '--model noah_resnet50 -b 8 --img-size 32 --workers 0',
     'ResNet-50 recipe at 32 px, batch 8'),
    ('--epochs 100 ', '--epochs 1 ', '1 epoch instead of 100'),
    ('python train.py ./datasets/flowers', 'python train.py ./datasets/flowers --img-size 32 -b 8 --workers 0 --epochs 1',
     'fine-tuning examples at 32 px, batch 8, 1 epoch (a later --epochs on the line still wins: see the next row)'),
    (' --epochs 30', ' --epochs 1', '1 epoch instead of 30'),
    (' --pretrained ', ' ', 'timm weights come from the Hugging Face hub and tests download nothing (loading local '
                            'pretrained files: test_models_beyond.py, test_pretrained.py); the model is the same'),
    ('python -m noah_mlp.demo', 'python -m noah_mlp.demo --epochs 1 --nproc 1 --limit 300',
     'the demo on 300 digits for 1 epoch (the full demo takes minutes: test_demo.py)'),
    ("create_model('noah_gmlp_ti16_224', num_classes=3, noah_head_num=8)",
     "create_model('noah_gmlp_ti16_224', num_classes=3, noah_head_num=8, num_blocks=2)",
     'the sharing example with 2 of its 30 blocks: ONNX export and the onnxruntime check take minutes at full depth'),
]

# Blocks that do not run, by a line they contain, with the reason.
NOT_RUN = {
    'python -m pytest -q': 'it is the test suite itself, which runs this test',
    'python train.py ./my_dataset': 'fine-tunes 20-60M-parameter models at 224 px from hub weights or a 240 MB stock '
                                    'file; tests/test_pretrained.py runs the same three routes (hub cache, '
                                    '--pretrained-path, --initial-checkpoint) at test size',
    'python benchmarks/gpu_check.py': 'a GPU check; without CUDA it runs its CPU smoke mode, which '
                                      'tests/test_gpu_check.py runs',
    'python benchmarks/bench_model.py': 'speed measurements: over 10 minutes on 2 shared cores even with --quick; '
                                        'benchmarks are scripts, not tests (benchmarks/README.md)',
}

# Commands installing packages are not re-run: the test environment is the installed one.
PIP_PREFIX = re.compile(r'^pip install [^&\n]*(&&\s*)?', re.M)


def readme_blocks() -> List[Tuple[str, str, int]]:
    """(language, code, line number) of every fenced python / bash block of README.md."""
    text = open(README, encoding='utf-8').read()
    blocks = []
    for m in re.finditer(r'^```(\w*)\n(.*?)^```', text, re.M | re.S):
        if m.group(1) in ('python', 'bash'):
            blocks.append((m.group(1), m.group(2), text[:m.start()].count('\n') + 1))
    return blocks


def _not_run_reason(code: str):
    return next((why for key, why in NOT_RUN.items() if key in code), None)


BLOCKS = readme_blocks()
RUN = [(lang, code, line) for lang, code, line in BLOCKS if _not_run_reason(code) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def prepare(code: str) -> str:
    code = PIP_PREFIX.sub('', code)
    for old, new, _ in SUBSTITUTIONS:
        code = code.replace(old, new.replace('{port}', str(_free_port())))
    return code


def _write_checkpoint(path: str) -> None:
    import timm
    import noah_mlp  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model('noah_gmlp_ti16_224')
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    args = argparse.Namespace(model='noah_gmlp_ti16_224', num_classes=1000, img_size=None, input_size=None,
                              model_kwargs={}, crop_pct=0.9)
    torch.save({'state_dict': model.state_dict(), 'state_dict_ema': ema, 'epoch': 0, 'arch': 'noah_gmlp_ti16_224',
                'args': args}, path)


@pytest.fixture(scope='module')
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp('readme_stand_ins')
    make_image_folder(str(root / 'datasets' / 'ILSVRC2012'), classes=3, train_per_class=12, val_per_class=3)
    ckpt = root / 'noah_gmlp_ti16.pth.tar'
    _write_checkpoint(str(ckpt))
    rng = np.random.default_rng(0)
    for name in ('cat.jpg', 'dog.jpg'):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / name)
    return root


def _workdir(tmp_path, stand_ins) -> str:
    """A fresh folder with the stand-ins and links to the repository's scripts, as a user's checkout would have."""
    for name in ('train.py', 'validate.py', 'distributed_train.sh', 'configs', 'benchmarks'):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    for rel in STAND_INS:
        if rel.startswith('datasets/'):
            src = stand_ins / 'datasets' / 'ILSVRC2012'
        elif rel.endswith('.pth.tar'):
            src = stand_ins / 'noah_gmlp_ti16.pth.tar'
        else:
            src = stand_ins / rel
        dst = tmp_path / rel
        os.makedirs(dst.parent, exist_ok=True)
        os.symlink(src, dst)
    return str(tmp_path)


def test_every_block_is_run_or_listed():
    assert len(BLOCKS) >= 8  # the README's examples did not vanish from the parse
    for key in NOT_RUN:
        assert sum(key in code for _, code, _ in BLOCKS) == 1, f'NOT_RUN entry {key!r} must match exactly one block'
    assert len(RUN) == len(BLOCKS) - len(NOT_RUN)
    # every substitution still applies to some block, and every stand-in is named by one
    text = ''.join(code for _, code, _ in BLOCKS)
    for old, _, why in SUBSTITUTIONS:
        assert old in text, f'stale substitution {old!r} ({why})'
    for rel in STAND_INS:
        assert rel in text, f'stale stand-in {rel!r}'


@pytest.mark.parametrize('lang,code,line', RUN, ids=[f'{lang}-line{line}' for lang, _, line in RUN])
def test_readme_block_runs(lang, code, line, tmp_path, stand_ins):
    cwd = _workdir(tmp_path, stand_ins)
    code = prepare(code)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', MPLBACKEND='Agg',
               PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    if lang == 'python':
        cmd = [sys.executable, '-c', code]
    else:
        cmd = ['bash', '-euo', 'pipefail', '-c', code]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f'README.md line {line} ({lang}) failed:\n{code}\n--- stdout\n' \
                                f'{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}'
