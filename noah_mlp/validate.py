"""Evaluate timm / NOAH models: ``noah-validate`` / ``python validate.py``.

    python validate.py DATA --model noah_gmlp_ti16_224 --checkpoint model_best.pth.tar --crop-pct 0.9

Reports top-1, top-5 and the loss; ``--results-file`` writes them as JSON. Checkpoints may be this
project's (their training arguments fill in --num-classes, --img-size and --model-kwargs),
upstream timm-format training checkpoints, or bare state dicts; none is unpickled unsafely.
"""
import argparse
import json
import logging
import sys
import time
from typing import Any, Dict, List, Optional

import torch
from timm.data import create_loader

from .checkpoint import atomic_write_text, check_compatible, extract_state_dict, safe_load
from .cli_common import (
    amp_autocast, create_model_checked, default_loader_workers, resolve_data_config_checked, resolve_device,
    setup_logging)
from .config import (
    INTERPOLATIONS, ArgumentParser, KeyValueAction, check_image_args, compile_backend, device_name, non_negative_int,
    positive_float, positive_int)
from .datasets import build_dataset, class_names
from .errors import UserError, cli_main
from .run_folder import check_writable_file
from .train import evaluate

__all__ = ['build_parser', 'main', 'validate']

_logger = logging.getLogger('noah_mlp.validate')


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='validate.py', description='Evaluate timm / NOAH image classifiers (timm validate.py flags).',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, checks=[check_image_args])
    p.add_argument('data', nargs='?', metavar='DIR', help='dataset root (ImageFolder with val/ or validation/)')
    p.add_argument('--data-dir', metavar='DIR', default=None)
    p.add_argument('--dataset', metavar='NAME', default='', help='timm dataset spec (empty: ImageFolder)')
    p.add_argument('--split', metavar='NAME', default='validation')
    p.add_argument('--class-map', default='', metavar='FILE')
    p.add_argument('--model', '-m', default='', metavar='NAME')
    p.add_argument('--checkpoint', default='', metavar='PATH')
    p.add_argument('--pretrained', action='store_true', default=False)
    p.add_argument('--pretrained-path', default=None, metavar='FILE',
                   help="load FILE as the model's pretrained weights (implies --pretrained)")
    p.add_argument('--noah-head', action='store_true', default=False,
                   help='the model is timm --model with a NOAH head (default: as the checkpoint was trained)')
    p.add_argument('--use-ema', action='store_true', default=False, help='use the EMA weights of the checkpoint')
    p.add_argument('--num-classes', type=positive_int, default=None, help='default: from the checkpoint, else the model')
    p.add_argument('--gp', default=None)
    p.add_argument('--img-size', default=None, type=positive_int, metavar='N', help='evaluate (and build the model) at N px')
    p.add_argument('--in-chans', type=positive_int, default=None)
    p.add_argument('--input-img-mode', default=None, metavar='MODE', help='PIL mode (default: L for 1 channel, else RGB)')
    p.add_argument('--input-size', default=None, nargs=3, type=positive_int, metavar='N')
    p.add_argument('--crop-pct', default=None, type=positive_float, metavar='PCT')
    p.add_argument('--crop-mode', default=None, choices=('center', 'squash', 'border'))
    p.add_argument('--mean', type=float, nargs='+', default=None)
    p.add_argument('--std', type=positive_float, nargs='+', default=None)
    p.add_argument('--interpolation', default='', choices=('',) + INTERPOLATIONS)
    p.add_argument('-b', '--batch-size', default=256, type=positive_int, metavar='N')
    p.add_argument('-j', '--workers', default=default_loader_workers(), type=non_negative_int, metavar='N',
                   help='data-loader processes; the default fits the machine: min(4, cores - 1)')
    p.add_argument('--model-kwargs', nargs='*', default=None, action=KeyValueAction, metavar='KEY=VALUE')
    p.add_argument('--device', default='auto', type=device_name)
    p.add_argument('--amp', action='store_true', default=False)
    p.add_argument('--amp-dtype', default=None, choices=['bfloat16', 'float16'])
    p.add_argument('--channels-last', action='store_true', default=False)
    p.add_argument('--torchcompile', nargs='?', type=compile_backend, default=None, const='inductor')
    p.add_argument('--no-prefetcher', action='store_true', default=False)
    p.add_argument('--pin-mem', action='store_true', default=False)
    p.add_argument('--log-freq', default=10, type=positive_int)
    p.add_argument('--results-file', default='', metavar='FILE', help='write the results as JSON')
    return p


def _arch_from_checkpoint(ckpt: Any) -> Dict[str, Any]:
    """Training arguments stored in one of our (or timm's) checkpoints, as a dict."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get('args'), argparse.Namespace):
        return vars(ckpt['args'])
    return {}


def validate(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    setup_logging(True)
    data_dir = args.data or args.data_dir
    if not args.model:
        raise UserError('no model given: pass --model NAME.')
    if args.results_file:
        check_writable_file(args.results_file, '--results-file')  # now, not after the evaluation

    ckpt = safe_load(args.checkpoint) if args.checkpoint else None
    train_args = _arch_from_checkpoint(ckpt)
    if train_args.get('model') and train_args['model'] != args.model:
        _logger.warning(f"note: the checkpoint was trained as {train_args['model']}, evaluating as {args.model}.")
    same_arch = train_args.get('model') == args.model
    num_classes = args.num_classes
    if num_classes is None and same_arch:
        num_classes = train_args.get('num_classes')
    model_kwargs = dict(train_args.get('model_kwargs') or {}) if (same_arch and args.model_kwargs is None) else {}
    model_kwargs.update(args.model_kwargs or {})
    img_size = args.input_size[-1] if args.input_size else args.img_size
    if img_size is None and same_arch:
        t_in = train_args.get('input_size')
        img_size = t_in[-1] if t_in else train_args.get('img_size')
    kwargs = dict(pretrained=args.pretrained, num_classes=num_classes, global_pool=args.gp, in_chans=args.in_chans)
    if img_size is not None:
        kwargs['img_size'] = img_size
    kwargs.update(model_kwargs)

    device = torch.device(resolve_device(args.device))
    trained_classes = ckpt.get('class_names') if isinstance(ckpt, dict) else None  # recorded by noah-train
    if not (isinstance(trained_classes, (list, tuple)) and trained_classes
            and all(isinstance(n, str) for n in trained_classes)):
        trained_classes = None
    dataset = build_dataset(
        args.dataset, data_dir, args.split, is_training=False, class_map=args.class_map,
        input_img_mode=args.input_img_mode, classes=trained_classes,
        classes_from=f"checkpoint '{args.checkpoint}'")

    noah_head = args.noah_head or (same_arch and bool(train_args.get('noah_head')))
    model = create_model_checked(args.model, noah_head=noah_head, pretrained_path=args.pretrained_path,
                                 adapt_pretrained_head=False, **kwargs)
    if ckpt is not None:
        sd = extract_state_dict(ckpt, use_ema=args.use_ema, path=args.checkpoint)
        if args.use_ema and not (isinstance(ckpt, dict) and ('state_dict_ema' in ckpt or 'model_ema' in ckpt)):
            _logger.warning('note: --use-ema given but the checkpoint has no EMA weights; using its weights.')
        check_compatible(model, sd, args.checkpoint, args.model)
        model.load_state_dict(sd)
        _logger.info(f"Loaded {'EMA ' if args.use_ema else ''}weights from '{args.checkpoint}'.")
    n_cls = getattr(model, 'num_classes', None)
    labels = class_names(dataset)
    if labels and n_cls and len(labels) > n_cls:
        raise UserError(f'the dataset has {len(labels)} classes but the model predicts {n_cls}: '
                        f'pass --num-classes or a matching checkpoint.')

    data_cfg_args = dict(vars(args))
    if img_size is not None:
        data_cfg_args['img_size'] = img_size
    data_config = resolve_data_config_checked(data_cfg_args, model, args.model, use_test_size=True)
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    run_model = torch.compile(model, backend=args.torchcompile) if args.torchcompile else model
    amp_dtype = args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')
    autocast = amp_autocast(device, args.amp, amp_dtype)
    workers = max(0, args.workers)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=workers, crop_pct=data_config['crop_pct'], crop_mode=data_config['crop_mode'],
        pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher,
        persistent_workers=False)
    t0 = time.time()
    metrics = evaluate(run_model, loader, args, device, autocast, False, 0, 1, len(dataset), args.no_prefetcher,
                       args.channels_last)
    elapsed = time.time() - t0
    results = dict(
        model=args.model, checkpoint=args.checkpoint or None, top1=round(metrics['top1'], 4),
        top1_err=round(100 - metrics['top1'], 4), top5=round(metrics['top5'], 4),
        top5_err=round(100 - metrics['top5'], 4), loss=round(metrics['loss'], 6), images=metrics['count'],
        param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        img_size=data_config['input_size'][-1], crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'], use_ema=args.use_ema, amp=args.amp)
    _logger.info(f"* {args.model}: top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}%  "
                 f"loss {results['loss']:.4f}  ({results['images']} images, {elapsed:.1f} s, "
                 f"{results['img_size']} px, crop {results['crop_pct']})")
    if args.results_file:
        atomic_write_text(json.dumps(results, indent=2) + '\n', args.results_file)
        _logger.info(f'Results written to {args.results_file}')
    return results


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main(lambda: (validate(argv), 0)[1])


if __name__ == '__main__':
    sys.exit(main())
