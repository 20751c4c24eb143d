"""NOAH on a CNN and a ViT: noah_resnet50 vs resnet50 and noah_deit_small_patch16_224 vs deit_small_patch16_224.

Each NOAH model is timed against its linear-head twin side by side in one process, rounds interleaved
(see common.py): a training step (forward + backward of cross-entropy, head dropout as published) and
inference (eval, no_grad). ResNet-50: NOAH over 7x7 tokens of 2048 channels, N=4, r=1/8; DeiT-S: 196
tokens of 384 channels, N=4, r=1/2. The head's share of the multiply-adds (L * K * C against the
model's) is printed next to each ratio: the goal is that share plus at most 3 points.

    python benchmarks/bench_beyond.py            # ~3 minutes on 2 quiet cores
    python benchmarks/bench_beyond.py --quick    # 2 rounds, a smoke test
"""
import argparse
import os
import sys

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, machine_line, paired_ratio  # noqa: E402
import noah_mlp  # noqa: E402,F401  (registers the models)

PAIRS = [('resnet50', 'noah_resnet50'), ('deit_small_patch16_224', 'noah_deit_small_patch16_224')]
# multiply-adds of one 224 px image (fvcore-style counts; the head's own count is computed below)
MODEL_MACS = {'resnet50': 4.11e9, 'deit_small_patch16_224': 4.61e9}


def head_mac_share(model: torch.nn.Module, x: torch.Tensor, baseline: str) -> float:
    """Extra multiply-adds of the NOAH head over a linear head, as a share of the linear-head model's."""
    with torch.no_grad():
        tokens, _ = model.forward_noah_tokens(model.forward_features(x[:1]))
    L, C = tokens.shape[1:]
    K = model.noah_head.num_classes
    return (L * K * C - K * C) / MODEL_MACS[baseline]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=6)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--quick', action='store_true')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    print(f'machine: {machine_line()}')
    print(f'B={args.batch}, 224 px, fp32, {rounds} interleaved rounds per figure\n')
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    for baseline, noah in PAIRS:
        torch.manual_seed(0)
        models = {baseline: timm.create_model(baseline), noah: timm.create_model(noah)}

        def train(m):
            def step():
                m.train()
                m.zero_grad(set_to_none=True)
                F.cross_entropy(m(x), y).backward()
            return step

        def infer(m):
            def step():
                m.eval()
                with torch.no_grad():
                    m(x)
            return step

        share = head_mac_share(models[noah].eval(), x, baseline)
        print(f'{noah} vs {baseline}: the NOAH head adds {100 * share:.1f}% of the multiply-adds')
        for title, make in (('training step', train), ('inference', infer)):
            times = interleaved_times({n: make(m) for n, m in models.items()}, rounds)
            q1, med, q3 = paired_ratio(times, noah, baseline)
            fastest = min(times[noah]) / min(times[baseline])
            print(f'  {title:14s} {100 * (med - 1):+.1f}% (IQR {100 * (q1 - 1):+.1f}% .. {100 * (q3 - 1):+.1f}%; '
                  f'fastest rounds {100 * (fastest - 1):+.1f}%; linear {1e3 * min(times[baseline]):.0f} ms)')
        print()
    print(f'machine after: {machine_line()}')


if __name__ == '__main__':
    main()
