"""Whole model: noah_gmlp_ti16_224 vs timm's gmlp_ti16_224 (linear head) and vs the same NOAH model
with the published grouped-conv head, measured side by side in one process (see common.py).

Figures (2-core CPU, fp32, B=16, 224 px):
  * training step (forward + backward of cross-entropy), head dropout 0.1: NOAH / linear - 1 (target <= 15%),
  * the same with head dropout 0 (target <= 5%),
  * inference (eval, no_grad) (target <= 5%),
  each also against the grouped-conv NOAH head, plus the bytes autograd saves for backward and,
  with --memory, the peak RSS of one step of each candidate in a fresh subprocess.

    python benchmarks/bench_model.py             # ~3-5 minutes on 2 quiet cores
    python benchmarks/bench_model.py --quick     # 2 rounds, a smoke test
"""
import argparse
import json
import os
import subprocess
import sys

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (GroupedConvNoahHead, current_rss, interleaved_times, machine_line, mib,  # noqa: E402
                    paired_ratio, peak_rss, quartiles, reset_peak_rss, saved_tensor_bytes)
import noah_mlp  # noqa: E402,F401  (registers the models)

TITLES = {
    'linear': "timm linear head",
    'noah': 'NOAH, head dropout 0.1',
    'noah_p0': 'NOAH, head dropout 0',
    'gconv': 'NOAH grouped-conv, dropout 0.1',
    'gconv_p0': 'NOAH grouped-conv, dropout 0',
}


def build(name, args):
    torch.manual_seed(0)
    if name == 'linear':
        return timm.create_model(args.baseline)
    drop = 0. if name.endswith('_p0') else 0.1
    model = timm.create_model(args.model, head_drop_rate=drop)
    if name.startswith('gconv'):
        model.head = GroupedConvNoahHead(model.head)
    return model


def make_batch(args):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    return x, y


def train_step(model, x, y):
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return step


def infer_step(model, x):
    model.eval()

    def step():
        with torch.no_grad():
            model(x)
    return step


def peak_of(args, name, mode):
    model = build(name, args)
    x, y = make_batch(args)
    step = train_step(model, x, y) if mode == 'train' else infer_step(model, x)
    before = current_rss()
    reset_peak_rss()
    step()
    print(json.dumps({'peak_growth': peak_rss() - before}))


def measure_peaks(args, names, mode):
    out = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), '--peak-of', name, '--mode', mode,
               '--threads', str(args.threads), '--batch', str(args.batch), '--img-size', str(args.img_size),
               '--model', args.model, '--baseline', args.baseline]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])['peak_growth']
    return out


def report(times, names, anchor_names, saved=None, peaks=None):
    print(f'{"candidate":34s} {"median ms":>10s} {"min ms":>8s}' + (f' {"saved for bwd":>14s}' if saved else '')
          + (f' {"peak RSS growth":>16s}' if peaks else ''))
    for n in names:
        line = f'{TITLES[n]:34s} {1e3 * quartiles(times[n])[1]:10.1f} {1e3 * min(times[n]):8.1f}'
        if saved:
            line += f' {mib(saved[n]):>14s}'
        if peaks:
            line += f' {mib(peaks[n]):>16s}'
        print(line)
    for n, anchor in anchor_names:
        q1, med, q3 = paired_ratio(times, n, anchor)
        best = min(times[n]) / min(times[anchor])
        print(f'{TITLES[n]} vs {TITLES[anchor]}: {100 * (med - 1):+.1f}% (IQR {100 * (q1 - 1):+.1f}% .. '
              f'{100 * (q3 - 1):+.1f}%; fastest rounds {100 * (best - 1):+.1f}%)')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='noah_gmlp_ti16_224')
    ap.add_argument('--baseline', default='gmlp_ti16_224')
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--img-size', type=int, default=224)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--train-rounds', type=int, default=15)
    ap.add_argument('--infer-rounds', type=int, default=25)
    ap.add_argument('--quick', action='store_true', help='2 training / 3 inference rounds, no subprocesses')
    ap.add_argument('--memory', action='store_true', help='peak RSS per candidate, fresh subprocesses')
    ap.add_argument('--skip-gconv', action='store_true', help='leave out the grouped-conv anchor (faster)')
    ap.add_argument('--peak-of', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--mode', default='train', help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_of:
        return peak_of(args, args.peak_of, args.mode)
    train_rounds, infer_rounds = (2, 3) if args.quick else (args.train_rounds, args.infer_rounds)

    print(f'machine: {machine_line()}')
    print(f'{args.model} vs {args.baseline}, B={args.batch}, {args.img_size} px, fp32\n')
    x, y = make_batch(args)
    names = ['linear', 'noah', 'noah_p0'] + ([] if args.skip_gconv else ['gconv', 'gconv_p0'])
    models = {n: build(n, args) for n in names}

    print(f'--- training step (forward + backward), {train_rounds} interleaved rounds ---')
    saved = {}
    for n in names:
        models[n].train()
        saved[n] = saved_tensor_bytes(lambda: F.cross_entropy(models[n](x), y))
    times = interleaved_times({n: train_step(models[n], x, y) for n in names}, train_rounds)
    peaks = measure_peaks(args, names, 'train') if args.memory and not args.quick else None
    pairs = [('noah', 'linear'), ('noah_p0', 'linear')]
    if not args.skip_gconv:
        pairs += [('gconv', 'linear'), ('gconv_p0', 'linear')]
    report(times, names, pairs, saved, peaks)

    inames = ['linear', 'noah'] + ([] if args.skip_gconv else ['gconv'])
    print(f'\n--- inference (eval, no_grad), {infer_rounds} interleaved rounds ---')
    times = interleaved_times({n: infer_step(models[n], x) for n in inames}, infer_rounds)
    peaks = measure_peaks(args, inames, 'infer') if args.memory and not args.quick else None
    pairs = [('noah', 'linear')] + ([] if args.skip_gconv else [('gconv', 'linear')])
    report(times, inames, pairs, None, peaks)
    print(f'\nmachine after: {machine_line()}')


if __name__ == '__main__':
    main()
