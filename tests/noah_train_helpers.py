"""Helpers for the training / validation / demo tests: tiny ImageFolder datasets and tiny models."""
import os
import subprocess
import sys
from typing import List, Optional

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a 16 px NOAH Mixer with 4 px patches: 16 tokens, two blocks, 32 channels (~20k parameters)
TINY_MODEL = 'noah_mixer_s16_224'
TINY = ['--model', TINY_MODEL, '--model-kwargs', 'num_blocks=2', 'embed_dim=32', 'patch_size=4', '--img-size', '16']
FAST = ['-b', '8', '--workers', '0', '--opt', 'adamw', '--lr', '2e-3', '--warmup-epochs', '0', '--log-interval', '2']


def make_image_folder(root: str, classes: int = 3, train_per_class: int = 12, val_per_class: int = 3,
                      size: int = 16, val_name: Optional[str] = 'val', seed: int = 0) -> str:
    """ImageFolder with train/ and `val_name`/: class c is a noisy image whose colour channel c is bright."""
    rng = np.random.default_rng(seed)
    splits = [('train', train_per_class)] + ([(val_name, val_per_class)] if val_name else [])
    for split, n in splits:
        for c in range(classes):
            folder = os.path.join(root, split, f'class{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                a[..., c % 3] += 180
                Image.fromarray(a).save(os.path.join(folder, f'{i}.png'))
    return root


def run_cli(script: str, args: List[str], timeout: float = 300, cwd: Optional[str] = None, env=None):
    """Run `python script args` (or `bash script` for .sh) in a subprocess; returns CompletedProcess."""
    cmd = ['bash', script] if script.endswith('.sh') else [sys.executable, script]
    full_env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    full_env.update(env or {})
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                          env=full_env)


class EvilPickle:
    """Unpickling this runs `touch MARKER`: what a crafted checkpoint would do if its pickle were trusted."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))
