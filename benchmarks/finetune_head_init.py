"""Does starting the NOAH head from a pretrained linear head shorten fine-tuning? (demo digits, CPU)

1. "Pretrain" the linear-head sibling (a Mixer with the demo's architecture) on the demo
   digits for a few epochs, with this package's train.py.
2. Fine-tune its NOAH twin (kv_split=False) from that checkpoint twice with the same recipe and
   seed: NOAH head initialised fresh, and NOAH head started from the linear head
   (linear_head_init=True: exactly the linear model's logits at step 0).
3. Print held-out top-1 after every fine-tuning epoch for both, and the linear model's own.

    python benchmarks/finetune_head_init.py [--pretrain-epochs 4] [--epochs 4] [--output DIR]

A few minutes on 2 cores (one training process at a time, --workers 0).
"""
import argparse
import csv
import os
import subprocess
import sys
import tempfile
from typing import List

from noah_mlp.demo import DEMO_IMG_SIZE, DEMO_MODEL_KWARGS, write_digits_dataset

# this package's linear-head Mixer baseline: unlike timm's own entrypoints it takes the demo's
# architecture overrides (patch 4, 4 blocks, 128 channels), and noah_mixer_s16_075_224 is its twin
SIBLING = 'mixer_s16_075_224'


def _train(data: str, out: str, experiment: str, model: str, epochs: int, lr: str, extra: List[str]) -> List[float]:
    args = [
        data, '--model', model, '--model-kwargs', *DEMO_MODEL_KWARGS, *extra, '--img-size', str(DEMO_IMG_SIZE),
        '--val-split', 'val', '--crop-pct', '1.0', '-b', '64', '--epochs', str(epochs), '--warmup-epochs', '0',
        '--opt', 'adamw', '--lr', lr, '--weight-decay', '0.05', '--min-lr', '1e-5', '--clip-grad', '1.0',
        '--smoothing', '0.1', '--scale', '0.7', '1.0', '--ratio', '0.85', '1.18', '--hflip', '0',
        '--color-jitter', '0', '--workers', '0', '--log-interval', '1000', '--seed', '0',
        '--output', out, '--experiment', experiment,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2'))
    subprocess.run([sys.executable, '-m', 'noah_mlp.train', *args], check=True, env=env, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, experiment, 'summary.csv')) as f:
        return [float(row['eval_top1']) for row in csv.DictReader(f)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--pretrain-epochs', type=int, default=4)
    p.add_argument('--epochs', type=int, default=4, help='fine-tuning epochs')
    p.add_argument('--output', default=None, help='working folder (default: a temporary one)')
    args = p.parse_args()
    out = args.output or tempfile.mkdtemp(prefix='noah_head_init_')
    data = os.path.join(out, 'digits')
    if not os.path.isdir(data):
        write_digits_dataset(data)

    linear = _train(data, out, 'linear', SIBLING, args.pretrain_epochs, '2e-3', [])
    pretrained = os.path.join(out, 'linear', 'last.pth.tar')
    print(f'{SIBLING} (linear head), {args.pretrain_epochs} epochs from scratch: top-1 per epoch '
          + ' '.join(f'{t:.1f}' for t in linear), flush=True)
    runs = {
        'NOAH head fresh': ['kv_split=False'],
        'NOAH head from the linear head': ['kv_split=False', 'linear_head_init=True'],
    }
    for label, kwargs in runs.items():
        top1 = _train(data, out, label.replace(' ', '_'), f'noah_{SIBLING}', args.epochs, '5e-4',
                      kwargs + ['--initial-checkpoint', pretrained])
        print(f'fine-tune noah_{SIBLING}, {label:31s}: top-1 per epoch ' + ' '.join(f'{t:.1f}' for t in top1),
              flush=True)


if __name__ == '__main__':
    main()
