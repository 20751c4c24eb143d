"""Whole-pipeline throughput: noah_mlp.train on the demo data vs the model's own training step.

Writes the demo's digits ImageFolder (scikit-learn's 8x8 digits at 32 px), then
  1. times the demo model's bare training step (forward, label-smoothed cross-entropy, backward,
     gradient clipping, AdamW step) on random tensors of the demo's batch size: images/s,
  2. runs ``python -m noah_mlp.train`` with the demo's arguments (one process) and reads the
     images/s it logs (the first epoch is left out as warm-up),
  3. times the bare step again, so the training run is bracketed by the anchor.
The figure is (bare-step images/s) / (train.py images/s) - 1: what the loop adds (data loading and
augmentation with --workers, loss bookkeeping, logging, LR schedule, checkpoints at epoch ends).

    python benchmarks/bench_pipeline.py                 # ~1-2 minutes on 2 cores
    python benchmarks/bench_pipeline.py --quick
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line  # noqa: E402
import noah_mlp  # noqa: E402,F401
from noah_mlp.demo import DEMO_IMG_SIZE, DEMO_MODEL, DEMO_MODEL_KWARGS, demo_train_args, write_digits_dataset  # noqa: E402

RATE = re.compile(r'Train: epoch (\d+) .*?([0-9.]+) img/s')


def model_kwargs():
    out = {}
    for item in DEMO_MODEL_KWARGS:
        key, value = item.split('=')
        out[key] = int(value)
    return out


def bare_step_rate(batch: int, steps: int, threads: int, device: str = 'cpu', amp_dtype=None) -> float:
    """Images/s of the demo model's own training step on random tensors (median over steps);
    on CUDA each step ends with a synchronize, and `amp_dtype` runs it under autocast."""
    torch.manual_seed(0)
    model = timm.create_model(DEMO_MODEL, num_classes=10, img_size=DEMO_IMG_SIZE, drop_path_rate=0.05,
                              **model_kwargs()).train().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(batch, 3, DEMO_IMG_SIZE, DEMO_IMG_SIZE, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    cuda = torch.device(device).type == 'cuda'
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def train_py_rates(data_root: str, out_dir: str, batch: int, epochs: int, workers: int, threads: int,
                   extra_args=()):
    """img/s that `python -m noah_mlp.train` logs on the demo digits after epoch 0, and its wall time."""
    args = demo_train_args(data_root, out_dir, epochs=epochs, batch_size=batch, workers=workers,
                           experiment=f'bench_w{workers}') + list(extra_args)
    args[args.index('--log-interval') + 1] = '5'
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, '-m', 'noah_mlp.train'] + args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f'train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    rates = [(int(m.group(1)), float(m.group(2))) for m in RATE.finditer(proc.stdout + proc.stderr)]
    return [r for e, r in rates if e >= 1], wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', default=None, help='an existing demo digits folder (default: write one to a temp dir)')
    ap.add_argument('--batch', type=int, default=64, help='the demo uses 64 images per step in all')
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--workers', type=int, nargs='+', default=[0, 1], help='train.py --workers settings to run')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--quick', action='store_true', help='2 epochs, workers 0 only')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.workers = 2, [0]
    print(f'machine: {machine_line()}')
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = os.path.join(tmp, 'digits')
            counts = write_digits_dataset(data)
            print(f"demo data: {counts['train']} train / {counts['val']} val digits, {DEMO_IMG_SIZE} px")
        print(f'model: {DEMO_MODEL} {" ".join(DEMO_MODEL_KWARGS)}, batch {args.batch}, '
              f'OMP/torch threads {args.threads}\n')
        before = bare_step_rate(args.batch, 20, args.threads)
        results = []
        for workers in args.workers:
            rates, wall = train_py_rates(data, os.path.join(tmp, 'runs'), args.batch, args.epochs, workers, args.threads)
            results.append((workers, rates, wall))
        after = bare_step_rate(args.batch, 20, args.threads)
    anchor = (before + after) / 2
    print(f'bare training step (fwd, loss, bwd, clip, AdamW): {before:.0f} img/s before, {after:.0f} img/s after')
    for workers, rates, wall in results:
        rate = statistics.median(rates)
        print(f'train.py --workers {workers}: median {rate:.0f} img/s over {len(rates)} log lines after epoch 0 '
              f'(range {min(rates):.0f}-{max(rates):.0f}; whole run {wall:.1f} s incl. start-up and evaluation); '
              f'the loop adds {100 * (anchor / rate - 1):+.0f}% to the bare step')
    print(f'\nmachine after: {machine_line()}')


if __name__ == '__main__':
    main()
