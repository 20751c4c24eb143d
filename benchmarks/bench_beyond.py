"""NOAH on a CNN and a ViT: noah_resnet50 vs resnet50 and noah_deit_small_patch16_224 vs deit_small_patch16_224.

What the NOAH head costs a whole model, training step (forward + backward of cross-entropy, head dropout
as published) and inference (eval, no_grad), at 224 px, fp32. ResNet-50: NOAH over 7x7 tokens of 2048
channels, N=4, r=1/8; DeiT-S: 196 tokens of 384 channels, N=4, r=1/2. Both models of a pair share one
backbone, so the figure is

    (backbone + NOAH head) / (backbone + linear head) - 1,

with the two heads timed side by side on the same backbone features over many interleaved rounds (the
backward reaches the features, as in a step), and the backbone timed on its own. On a shared machine
the heads' difference is the part that needs the rounds; `--full` also times both whole models side by
side (noisier). The head's share of the multiply-adds is printed next to each figure: the goal is that
share plus at most 3 points.

    python benchmarks/bench_beyond.py            # ~5 minutes, one thread
    python benchmarks/bench_beyond.py --quick    # fewer rounds, a smoke test
"""
import argparse
import os
import statistics
import sys

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GroupedConvNoahHead, interleaved_times, machine_line, paired_ratio  # noqa: E402
import noah_mlp  # noqa: E402,F401  (registers the models)

PAIRS = [('resnet50', 'noah_resnet50'), ('deit_small_patch16_224', 'noah_deit_small_patch16_224')]
# multiply-adds of one 224 px image through the linear-head model (fvcore-style counts)
MODEL_MACS = {'resnet50': 4.11e9, 'deit_small_patch16_224': 4.61e9}


def head_mac_share(model: torch.nn.Module, features: torch.Tensor, baseline: str) -> float:
    """Extra multiply-adds of the NOAH head over a linear head, as a share of the linear-head model's."""
    tokens, _ = model.forward_noah_tokens(features[:1])
    L, C = tokens.shape[1:]
    K = model.noah_head.num_classes
    return (L * K * C - K * C) / MODEL_MACS[baseline]


def head_step(model, forward, features, y):
    def step():
        model.train()
        model.zero_grad(set_to_none=True)
        f = features.detach().requires_grad_()
        F.cross_entropy(forward(f), y).backward()
    return step


def head_infer(model, forward, features):
    def step():
        model.eval()
        with torch.no_grad():
            forward(features)
    return step


def grouped_conv_forward(model):
    """The same NOAH head computed as published (grouped 1x1 convolutions on materialised scores)."""
    gconv = GroupedConvNoahHead(model.noah_head)

    def forward(features):
        tokens, _ = model.forward_noah_tokens(features)
        gconv.train(model.training)
        return gconv(tokens)
    return forward


def backbone_times(model, x, rounds):
    def train():
        model.train()
        model.zero_grad(set_to_none=True)
        model.forward_features(x).float().mean().backward()

    def infer():
        model.eval()
        with torch.no_grad():
            model.forward_features(x)
    times = interleaved_times({'train': train, 'infer': infer}, rounds)
    return statistics.median(times['train']), statistics.median(times['infer'])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--head-rounds', type=int, default=20)
    parser.add_argument('--backbone-rounds', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1, help='1 keeps a shared machine\'s load out of the ratios')
    parser.add_argument('--full', action='store_true', help='also time both whole models side by side')
    parser.add_argument('--quick', action='store_true')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    head_rounds, backbone_rounds = (5, 1) if args.quick else (args.head_rounds, args.backbone_rounds)
    print(f'machine: {machine_line()}')
    print(f'B={args.batch}, 224 px, fp32; heads: {head_rounds} interleaved rounds, backbone: {backbone_rounds}\n')
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    for baseline, noah in PAIRS:
        torch.manual_seed(0)
        linear, model = timm.create_model(baseline), timm.create_model(noah)
        with torch.no_grad():
            features = model.eval().forward_features(x)
        share = head_mac_share(model, features, baseline)
        print(f'{noah} vs {baseline}: the NOAH head adds {100 * share:.1f}% of the multiply-adds')
        bb_train, bb_infer = backbone_times(model, x, backbone_rounds)
        forwards = {'linear': (linear, linear.forward_head), 'noah': (model, model.forward_head),
                    'gconv': (model, grouped_conv_forward(model))}
        for title, bb, make in (('training step', bb_train, lambda m, fw: head_step(m, fw, features, y)),
                                ('inference', bb_infer, lambda m, fw: head_infer(m, fw, features))):
            times = interleaved_times({n: make(m, fw) for n, (m, fw) in forwards.items()}, head_rounds)
            lin, nh, gc = (statistics.median(times[n]) for n in ('linear', 'noah', 'gconv'))
            q1, med, q3 = paired_ratio(times, 'noah', 'linear')
            print(f'  {title:14s} {100 * (nh - lin) / (bb + lin):+.1f}% of the model  (backbone {1e3 * bb:.0f} ms; '
                  f'heads: linear {1e3 * lin:.1f} ms, NOAH {1e3 * nh:.1f} ms, paired ratio {med:.2f} '
                  f'[{q1:.2f}..{q3:.2f}]); published grouped-conv form {1e3 * gc:.1f} ms, '
                  f'{100 * (gc - lin) / (bb + lin):+.1f}% of the model')
        if args.full:
            def whole(m, train):
                def step():
                    m.train(train)
                    with torch.set_grad_enabled(train):
                        out = m(x)
                        if train:
                            m.zero_grad(set_to_none=True)
                            F.cross_entropy(out, y).backward()
                return step
            for title, train in (('whole step', True), ('whole inference', False)):
                times = interleaved_times({'linear': whole(linear, train), 'noah': whole(model, train)},
                                          backbone_rounds * 2)
                q1, med, q3 = paired_ratio(times, 'noah', 'linear')
                print(f'  {title:14s} {100 * (med - 1):+.1f}% (IQR {100 * (q1 - 1):+.1f}% .. {100 * (q3 - 1):+.1f}%)')
        print()
    print(f'machine after: {machine_line()}')


if __name__ == '__main__':
    main()
