"""NOAH head alone: NoahHead (attention identity) vs the grouped-conv formulation it replaces.

Shape of the issue: B=32, L=196, C=128, K=1000, N=4, r=1/2, fp32, forward + backward.
Prints, measured side by side in one process (see common.py):
  * time ratio grouped-conv / NoahHead without dropout (target >= 4x),
  * bytes autograd saves for backward, NoahHead / grouped-conv (target <= 1/10),
  * the same with head dropout 0.1: NoahHead's chunked CPU kernel, SDPA's math backend, grouped conv,
  * peak RSS of one forward + backward of each candidate, each in a fresh subprocess (--memory),
  * what drawing a dropout mask over (16, N, K, L) costs: dense uniforms / bernoulli_ / F.dropout vs
    the geometric-gap drop positions of the chunked kernel.

    python benchmarks/bench_head.py            # ~1-2 minutes on 2 cores
    python benchmarks/bench_head.py --quick    # a few rounds, a smoke test
"""
import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (GroupedConvNoahHead, current_rss, interleaved_times, machine_line, mib,  # noqa: E402
                    paired_ratio, peak_rss, quartiles, reset_peak_rss, saved_tensor_bytes)
from noah_mlp import NoahHead  # noqa: E402


class SdpaMathHead(torch.nn.Module):
    """NoahHead forced through F.scaled_dot_product_attention (math backend on CPU with dropout)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        import noah_mlp.head as h
        real = h.class_attention
        h.class_attention = lambda q, k, v, dropout_p=0.: real(q, k, v, dropout_p, impl='sdpa')
        try:
            return self.head(x)
        finally:
            h.class_attention = real


def build(args, drop):
    torch.manual_seed(0)
    head = NoahHead(args.channels, args.classes, num_heads=args.heads, key_ratio=args.key_ratio, drop=drop).train()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.05)
    linear = PoolLinearHead(args.channels, args.classes).train()
    return {'noah': head, 'grouped_conv': GroupedConvNoahHead(head).train(), 'noah_sdpa': SdpaMathHead(head).train(),
            'linear': linear}


class PoolLinearHead(torch.nn.Module):
    """timm's MLP-Mixer head: average over tokens, then a linear classifier."""

    def __init__(self, channels, classes):
        super().__init__()
        self.fc = torch.nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(x.mean(1))


def make_input(args):
    torch.manual_seed(1)
    return torch.randn(args.batch, args.tokens, args.channels, requires_grad=True)


def fwd_bwd(model, x):
    def step():
        x.grad = None
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    return step


def peak_of(args, drop, name):
    """Run in a subprocess: peak RSS growth over one forward + backward of one candidate."""
    models = build(args, drop)
    x = make_input(args)
    step = fwd_bwd(models[name], x)
    before = current_rss()
    reset_peak_rss()
    step()
    print(json.dumps({'peak_growth': peak_rss() - before}))


def measure_peaks(args, drop, names):
    out = {}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), '--peak-of', name, '--drop', str(drop),
               '--threads', str(args.threads), '--batch', str(args.batch), '--tokens', str(args.tokens),
               '--channels', str(args.channels), '--classes', str(args.classes), '--heads', str(args.heads),
               '--key-ratio', str(args.key_ratio)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])['peak_growth']
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--tokens', type=int, default=196)
    ap.add_argument('--channels', type=int, default=128)
    ap.add_argument('--classes', type=int, default=1000)
    ap.add_argument('--heads', type=int, default=4)
    ap.add_argument('--key-ratio', type=float, default=0.5)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--rounds', type=int, default=15)
    ap.add_argument('--quick', action='store_true', help='3 rounds, no memory subprocesses')
    ap.add_argument('--memory', action='store_true', help='also peak RSS per candidate (fresh subprocesses)')
    ap.add_argument('--peak-of', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--drop', type=float, default=0., help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_of:
        return peak_of(args, args.drop, args.peak_of)
    rounds = 3 if args.quick else args.rounds

    print(f'machine: {machine_line()}')
    print(f'head: B={args.batch} L={args.tokens} C={args.channels} K={args.classes} N={args.heads} '
          f'r={args.key_ratio}, fp32, forward + backward, {rounds} interleaved rounds\n')
    x = make_input(args)
    for drop in (0., 0.1):
        models = build(args, drop)
        names = ['noah', 'grouped_conv'] + (['noah_sdpa'] if drop > 0 else []) + ['linear']
        with torch.no_grad():
            ref = models['grouped_conv'].eval()(x)
            err = (models['noah'].eval()(x) - ref).abs().max().item()
        for m in models.values():
            m.train()
        saved = {n: saved_tensor_bytes(lambda: models[n](x)) for n in names}
        times = interleaved_times({n: fwd_bwd(models[n], x) for n in names}, rounds)
        label = 'NoahHead (chunked CPU kernel)' if drop > 0 else 'NoahHead (SDPA flash)'
        print(f'--- head dropout {drop} (eval outputs agree to {err:.1e}) ---')
        print(f'{"candidate":34s} {"median ms":>10s} {"min ms":>8s} {"saved for backward":>20s}')
        titles = {'noah': label, 'grouped_conv': 'grouped-conv formulation', 'noah_sdpa': 'NoahHead via SDPA math backend',
                  'linear': 'timm head: token mean + Linear'}
        for n in names:
            print(f'{titles[n]:34s} {1e3 * quartiles(times[n])[1]:10.1f} {1e3 * min(times[n]):8.1f} {mib(saved[n]):>20s}')
        for n in names[1:-1]:
            q1, med, q3 = paired_ratio(times, n, 'noah')
            print(f'speed-up of NoahHead over {titles[n]}: {med:.2f}x (IQR {q1:.2f}-{q3:.2f}; '
                  f'fastest rounds {min(times[n]) / min(times["noah"]):.2f}x)')
            print(f'saved bytes NoahHead / {titles[n]}: 1/{saved[n] / saved["noah"]:.1f}')
        extra = [a - b for a, b in zip(times['noah'], times['linear'])]
        print(f'NoahHead costs {1e3 * quartiles(extra)[1]:.1f} ms more than the linear head per call '
              f'({quartiles(times["noah"])[1] / quartiles(times["linear"])[1]:.0f}x its time)')
        if args.memory and not args.quick:
            peaks = measure_peaks(args, drop, names)
            print('peak RSS growth of one forward+backward (fresh process each): ' +
                  ', '.join(f'{titles[n]} {mib(v)}' for n, v in peaks.items()))
        print()
    rng_costs(args, rounds)
    print(f'machine after: {machine_line()}')


def rng_costs(args, rounds):
    """What a dropout mask over (B, N, K, L) costs to draw, dense vs as geometric gaps."""
    from noah_mlp.head import bernoulli_drop_positions
    numel = 16 * args.heads * args.classes * args.tokens  # the model benchmark's B=16
    buf = torch.empty(numel)
    fns = {
        'torch.rand (dense uniforms)': lambda: torch.rand(numel),
        'bernoulli_ (dense mask)': lambda: buf.bernoulli_(0.9),
        'F.dropout (mask and product)': lambda: torch.nn.functional.dropout(buf, 0.1),
        'drop positions, geometric gaps': lambda: bernoulli_drop_positions(numel, 0.1),
    }
    times = interleaved_times(fns, rounds)
    print(f'--- drawing a dropout mask for B=16 x N x K x L = {numel / 1e6:.1f}M elements, p=0.1 ---')
    for name in fns:
        print(f'{name:34s} {1e3 * quartiles(times[name])[1]:8.1f} ms')
    print()


if __name__ == '__main__':
    main()
