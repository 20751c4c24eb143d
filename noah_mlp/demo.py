"""The embedded demo: train and evaluate a NOAH model with no ImageNet, ``python -m noah_mlp.demo``.

Writes the 1,797 handwritten 8x8 digits that ship inside scikit-learn as an ImageFolder
(``train/`` and ``val/``, one folder per digit, upsampled RGB PNGs), trains a small NOAH
MLP-Mixer on them with this package's training script (two processes with torchrun where the
machine has two or more cores), then evaluates the last checkpoint on the held-out split with
the validation script, prints ``held-out top-1 XX.XX%`` and draws the head's attention maps for
a few held-out digits (``{output}/demo/attention/*.png``).

Needs the ``demo`` extra (scikit-learn): ``pip install "noah-mlp[demo]"``.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from .cli_common import threads_per_process
from .errors import UserError, cli_main

__all__ = ['write_digits_dataset', 'demo_train_args', 'run_demo', 'main']

DEMO_MODEL = 'noah_mixer_s16_224'
# a small Mixer with a NOAH head for 32 px inputs: 8x8 = 64 tokens of 4x4 px patches
DEMO_MODEL_KWARGS = ['patch_size=4', 'num_blocks=4', 'embed_dim=128']
DEMO_IMG_SIZE = 32


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError('the demo needs scikit-learn: pip install "noah-mlp[demo]" (or pip install scikit-learn).') \
            from None
    return load_digits()


def write_digits_dataset(root: str, img_size: int = DEMO_IMG_SIZE, val_fraction: float = 0.2, seed: int = 0,
                         limit: Optional[int] = None) -> Dict[str, int]:
    """Write scikit-learn's 8x8 digits as ``root/{train,val}/{digit}/{index}.png`` (RGB, `img_size` px).

    The split is stratified per digit and fixed by `seed`. `limit` keeps only the first images
    (for quick tests). Returns the number of images per split.
    """
    import numpy as np
    from PIL import Image

    digits = _load_digits()
    images, labels = digits.images, digits.target
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    rng = np.random.default_rng(seed)
    counts = {'train': 0, 'val': 0}
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        if len(idx) == 0:
            continue
        idx = rng.permutation(idx)
        n_val = max(1, int(round(len(idx) * val_fraction))) if len(idx) > 1 else 0
        for split, chosen in (('val', idx[:n_val]), ('train', idx[n_val:])):
            folder = os.path.join(root, split, str(digit))
            os.makedirs(folder, exist_ok=True)
            for i in chosen:
                pixels = (images[i] * (255. / 16.)).clip(0, 255).astype(np.uint8)  # 0..16 grey levels
                img = Image.fromarray(pixels, mode='L').resize((img_size, img_size), Image.BICUBIC).convert('RGB')
                img.save(os.path.join(folder, f'{i:04d}.png'))
                counts[split] += 1
    return counts


def demo_train_args(data_root: str, output_dir: str, epochs: int = 20, batch_size: int = 32,
                    experiment: str = 'demo', workers: int = 0) -> List[str]:
    """The train.py arguments of the demo run (`batch_size` per process)."""
    return [
        data_root, '--model', DEMO_MODEL, '--model-kwargs', *DEMO_MODEL_KWARGS, '--img-size', str(DEMO_IMG_SIZE),
        '--val-split', 'val', '--crop-pct', '1.0',
        '-b', str(batch_size), '--epochs', str(epochs), '--warmup-epochs', '2', '--warmup-lr', '1e-5',
        '--opt', 'adamw', '--lr', '2e-3', '--weight-decay', '0.05', '--min-lr', '1e-5', '--clip-grad', '1.0',
        '--smoothing', '0.1', '--drop-path', '0.05', '--proj-drop', '0.0',
        '--scale', '0.7', '1.0', '--ratio', '0.85', '1.18', '--hflip', '0', '--color-jitter', '0',
        '--train-interpolation', 'bicubic',
        '--workers', str(workers), '--log-interval', '20', '--checkpoint-hist', '2',
        '--output', output_dir, '--experiment', experiment,
    ]


def _nproc(requested: Optional[int]) -> int:
    if requested is not None:
        return max(1, requested)
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def run_demo(output_dir: str, epochs: int = 20, nproc: Optional[int] = None, batch_size: Optional[int] = None,
             limit: Optional[int] = None, experiment: str = 'demo', quiet: bool = False) -> Dict[str, Any]:
    """Write the digits dataset, train, evaluate. Returns a dict with ``experiment_dir``,
    ``checkpoint`` (the last checkpoint, the one evaluated), ``best_checkpoint``, ``val_root``
    (the held-out ImageFolder split), ``data_root``, ``top1``, ``top5``, ``seconds`` and ``nproc``."""
    t0 = time.time()
    output_dir = os.path.abspath(output_dir)
    data_root = os.path.join(output_dir, 'digits')
    if not os.path.isdir(data_root):
        # write next to it, then rename: an interrupted demo never leaves a half-written dataset behind
        partial = data_root + '.partial'
        if os.path.isdir(partial):
            shutil.rmtree(partial)
        counts = write_digits_dataset(partial, limit=limit)
        os.replace(partial, data_root)
        if not quiet:
            print(f"Wrote {counts['train']} train / {counts['val']} val digit images to {data_root}", flush=True)
    nproc = _nproc(nproc)
    if batch_size is None:
        batch_size = 64 // nproc  # 64 images per optimizer step in all
    train_args = demo_train_args(data_root, output_dir, epochs=epochs, batch_size=batch_size, experiment=experiment)
    exp_dir = os.path.join(output_dir, experiment)
    last = os.path.join(exp_dir, 'last.pth.tar')
    if os.path.isfile(last):
        train_args += ['--resume', last]  # a previous demo run in this folder: continue it (or finish at once)
    threads, note = threads_per_process(nproc, os.environ.get('OMP_NUM_THREADS'))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if note and not quiet:
        print(note, flush=True)
    if nproc > 1:
        cmd = [sys.executable, '-m', 'noah_mlp.launch', '--standalone', f'--nproc-per-node={nproc}',
               '-m', 'noah_mlp.train'] + train_args
    else:
        cmd = [sys.executable, '-m', 'noah_mlp.train'] + train_args
    if not quiet:
        print(f'Training {DEMO_MODEL} ({" ".join(DEMO_MODEL_KWARGS)}, {DEMO_IMG_SIZE} px) for {epochs} epochs on '
              f'{nproc} process(es)...', flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL if quiet else None,
                          stderr=subprocess.PIPE if quiet else None, text=True)
    if proc.returncode != 0:
        detail = f'\n{proc.stderr.strip()}' if quiet and proc.stderr else ''
        raise UserError(f'demo training failed (exit status {proc.returncode}).{detail}')

    from .validate import validate
    results = validate([data_root, '--split', 'val', '--model', DEMO_MODEL, '--checkpoint', last,
                        '--crop-pct', '1.0', '--workers', '0', '-b', '128'])
    figures = _attention_figures(last, os.path.join(data_root, 'val'), os.path.join(exp_dir, 'attention'))
    seconds = time.time() - t0
    return dict(attention_figures=figures,
        experiment_dir=exp_dir, checkpoint=last, best_checkpoint=os.path.join(exp_dir, 'model_best.pth.tar'),
        data_root=data_root, val_root=os.path.join(data_root, 'val'), top1=results['top1'], top5=results['top5'],
        images=results['images'], seconds=seconds, nproc=nproc)


def _attention_figures(checkpoint: str, val_root: str, out_dir: str, digits=(0, 3, 7, 8)) -> List[str]:
    """Draw what the trained head attends to for the first held-out image of a few digits."""
    from .visualize import load_noah_model, write_attention_figures

    loaded = load_noah_model(DEMO_MODEL, checkpoint)
    picks = []
    for digit in digits:
        folder = os.path.join(val_root, str(digit))
        files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        if files:
            picks.append(os.path.join(folder, files[0]))
    paths = write_attention_figures(
        loaded.model, picks, out_dir, class_names=loaded.class_names, topk=3, data_config=loaded.data_config,
        names=[f'digit{os.path.basename(os.path.dirname(p))}_{os.path.splitext(os.path.basename(p))[0]}'
               for p in picks])
    return [str(p) for p in paths]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m noah_mlp.demo', description=__doc__.split('\n\n')[0])
    p.add_argument('--output', default='./noah_demo', metavar='DIR', help='folder for the dataset and the run')
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('--nproc', type=int, default=None, help='training processes (default: 2 with >= 2 cores)')
    p.add_argument('--limit', type=int, default=None, metavar='N', help='use only the first N digits (a quick smoke run)')
    return p


def _main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    r = run_demo(args.output, epochs=args.epochs, nproc=args.nproc, limit=args.limit)
    print(f"Demo: held-out top-1 {r['top1']:.2f}% (top-5 {r['top5']:.2f}%) on {r['images']} digit images never "
          f"trained on; {r['seconds']:.0f} s on {r['nproc']} process(es). Checkpoint: {r['checkpoint']}", flush=True)
    if r['attention_figures']:
        print(f"What the NOAH head attends to, for {len(r['attention_figures'])} held-out digits: "
              f"{os.path.dirname(r['attention_figures'][0])}", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main(lambda: _main(argv))


if __name__ == '__main__':
    sys.exit(main())
