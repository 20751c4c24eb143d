"""Evaluate timm / NOAH models: ``noah-validate`` / ``python validate.py``.

    python validate.py DATA --model noah_gmlp_ti16_224 --checkpoint model_best.pth.tar --crop-pct 0.9

Reports top-1, top-5 and the loss; ``--results-file`` writes them as JSON or CSV (``--results-format``). Checkpoints may be this
project's (their training arguments fill in --num-classes, --img-size and --model-kwargs),
upstream timm-format training checkpoints, or bare state dicts; none is unpickled unsafely.
"""
import argparse
import csv
import io
import json
import logging
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.data import RealLabelsImagenet, create_loader
from timm.utils import random_seed, reparameterize_model

from .checkpoint import atomic_write_text, check_compatible, extract_state_dict, safe_load
from .cli_common import (
    add_precision_args, amp_autocast, create_model_checked, default_loader_workers, prepare_runtime,
    resolve_data_config_checked, resolve_device,
    setup_logging)
from .config import (
    INTERPOLATIONS, ArgumentParser, HelpFormatter, KeyValueAction, check_image_args, compile_backend, device_name,
    non_negative_int, positive_float, positive_int, seed_int)
from .datasets import build_dataset, class_names
from .errors import UserError, cli_main
from .models._twins import remap_checkpoint
from .run_folder import check_writable_file
from .train_args import add_dataset_source_args, prog_name, refused_in_use
from .train import evaluate

__all__ = ['build_parser', 'main', 'validate']

_logger = logging.getLogger('noah_mlp.validate')


# dest -> why this script does not do what timm validate.py's flag does
REFUSED: Dict[str, str] = {
    'num_gpu': 'DataParallel over several GPUs is not used; evaluate on one device (or use train.py with torchrun)',
    'test_pool': 'test-time pooling resizes CNN pooling windows; MLP-Mixer token mixing fixes the token count',
    'tf_preprocessing': 'the TensorFlow preprocessing pipeline needs TensorFlow and is not implemented',
    'fuser': 'TorchScript fusers are obsolete in PyTorch 2; use --torchcompile',
    'torchscript': 'use --torchcompile',
    'aot_autograd': "functorch's memory-efficient fusion is gone from PyTorch 2; use --torchcompile",
    'retry': 'one evaluation per run: on out-of-memory lower -b yourself',
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog_name('validate.py'),
                       description='Evaluate timm / NOAH image classifiers with timm validate.py flags. '
                                   'Every timm 1.0 flag is accepted; the few this script refuses say why.',
                       formatter_class=HelpFormatter, usage='%(prog)s [DIR] --model NAME [--checkpoint PATH] [options]',
                       checks=[check_image_args])
    p.add_argument('data', nargs='?', metavar='DIR', help='dataset root (ImageFolder with val/ or validation/)')
    p.add_argument('--data-dir', metavar='DIR', default=None, help='dataset root (instead of the positional DIR)')
    p.add_argument('--dataset', metavar='NAME', default='', help='timm dataset spec (empty: ImageFolder)')
    p.add_argument('--split', metavar='NAME', default='validation', help='split to evaluate (val/ and validation/ both match)')
    p.add_argument('--num-samples', type=positive_int, default=None, metavar='N',
                   help='images in the split, for iterable (wds/tfds/hfids) datasets')
    add_dataset_source_args(p)
    p.add_argument('--model', '-m', default='', metavar='NAME', help='timm model name, e.g. noah_gmlp_ti16_224')
    p.add_argument('--checkpoint', default='', metavar='PATH',
                   help="weights to evaluate: the file's state_dict (its EMA weights with --use-ema)")
    p.add_argument('--pretrained', action='store_true', default=False,
                   help="evaluate the model's pretrained weights (its pretrained_cfg)")
    p.add_argument('--pretrained-path', default=None, metavar='FILE',
                   help="load FILE as the model's pretrained weights (implies --pretrained)")
    p.add_argument('--noah-head', action='store_true', default=False,
                   help='the model is timm --model with a NOAH head (default: as the checkpoint was trained)')
    p.add_argument('--use-ema', action='store_true', default=False,
                   help="evaluate the checkpoint's EMA weights (an error if it has none)")
    p.add_argument('--num-classes', type=positive_int, default=None, metavar='N', help='default: from the checkpoint, else the model')
    p.add_argument('--gp', default=None, metavar='POOL', help='global pool type (timm models that have one)')
    p.add_argument('--img-size', default=None, type=positive_int, metavar='N', help='evaluate (and build the model) at N px')
    p.add_argument('--in-chans', type=positive_int, default=None, metavar='N', help='input channels (default 3)')
    p.add_argument('--input-size', default=None, nargs=3, type=positive_int, metavar='N',
                   help='channels, height, width (e.g. 3 224 224); overrides --img-size')
    p.add_argument('--use-train-size', action='store_true', default=False,
                   help="use the model's training input size even where its config names a test size")
    p.add_argument('--crop-pct', default=None, type=positive_float, metavar='PCT', help='centre-crop ratio (NOAH release: 0.9)')
    p.add_argument('--crop-mode', choices=('center', 'squash', 'border'), default=None, type=str, metavar='MODE', help='center, squash or border')
    p.add_argument('--crop-border-pixels', type=non_negative_int, default=None, metavar='N', help='crop N pixels off every border first')
    p.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='normalisation mean per channel')
    p.add_argument('--std', type=positive_float, nargs='+', default=None, metavar='STD', help='normalisation std per channel')
    p.add_argument('--interpolation', choices=('',) + INTERPOLATIONS, default='', type=str, metavar='NAME', help="resize interpolation (default: the model's)")
    p.add_argument('-b', '--batch-size', default=256, type=positive_int, metavar='N', help='batch size')
    p.add_argument('-j', '--workers', default=default_loader_workers(), type=non_negative_int, metavar='N',
                   help='data-loader processes; the default fits the machine: min(4, cores - 1)')
    p.add_argument('--model-kwargs', nargs='*', default=None, action=KeyValueAction, metavar='KEY=VALUE',
                   help="model arguments (default: the checkpoint's training arguments)")
    p.add_argument('--device', type=device_name, default='auto', help='auto: CUDA when present, else CPU')
    add_precision_args(p)
    p.add_argument('--channels-last', action='store_true', default=False, help='channels_last memory layout')
    p.add_argument('--reparam', action='store_true', default=False,
                   help="fold re-parameterisable blocks (timm's reparameterize_model; no change for MLP models)")
    p.add_argument('--torchcompile', nargs='?', type=compile_backend, default=None, const='inductor', metavar='BACKEND',
                   help='torch.compile the model with this backend (inductor when given alone)')
    p.add_argument('--torchcompile-mode', type=str, default=None, metavar='MODE', help='torch.compile mode')
    p.add_argument('--no-prefetcher', action='store_true', default=False, help="no timm prefetcher (normalise on the host)")
    p.add_argument('--pin-mem', action='store_true', default=False, help='pin host memory in the data loader')
    p.add_argument('--log-freq', default=10, type=positive_int, metavar='N', help='log every N batches')
    p.add_argument('--seed', type=seed_int, default=42, metavar='S', help='random seed (a model without weights starts from it)')
    p.add_argument('--results-file', default='', metavar='FILE', help='write the results to FILE')
    p.add_argument('--results-format', default='json', choices=['json', 'csv'],
                   help='--results-file format (timm writes csv by default; json is kept here for existing users)')
    p.add_argument('--real-labels', default='', metavar='FILE',
                   help='ImageNet "ReaL" labels JSON: also report top-1/top-5 against them (real_top1, real_top5)')
    p.add_argument('--valid-labels', default='', metavar='FILE',
                   help='text file of class indices (one per line): score only those logits, for datasets '
                        'labelled with a subset of the classes (ImageNet-A/R)')
    for names, dest, kwargs in (
            (('--num-gpu',), 'num_gpu', dict(type=int, default=1, metavar='N')),
            (('--test-pool',), 'test_pool', dict(action='store_true', default=False)),
            (('--tf-preprocessing',), 'tf_preprocessing', dict(action='store_true', default=False)),
            (('--fuser',), 'fuser', dict(default='', metavar='NAME')),
            (('--torchscript',), 'torchscript', dict(action='store_true', default=False)),
            (('--aot-autograd',), 'aot_autograd', dict(action='store_true', default=False)),
            (('--retry',), 'retry', dict(action='store_true', default=False))):
        p.add_argument(*names, dest=dest, help=f'not supported: {REFUSED[dest]}', **kwargs)
    return p


def _arch_from_checkpoint(ckpt: Any) -> Dict[str, Any]:
    """Training arguments stored in one of our (or timm's) checkpoints, as a dict."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get('args'), argparse.Namespace):
        return vars(ckpt['args'])
    return {}


def _model_kwargs(args: argparse.Namespace, train_args: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[int]]:
    """create_model arguments: the command line, else the checkpoint's training arguments (same model only)."""
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
    kwargs['noah_head'] = args.noah_head or (same_arch and bool(train_args.get('noah_head')))
    return kwargs, img_size


def _load_checkpoint_weights(model: torch.nn.Module, ckpt: Any, args: argparse.Namespace) -> None:
    """The file's state_dict, or with --use-ema its EMA weights (refused when it has none), in the model's
    key names (`remap_checkpoint`: the NOAH authors' layouts load too)."""
    has_ema = isinstance(ckpt, dict) and any(isinstance(ckpt.get(k), dict) for k in ('state_dict_ema', 'model_ema'))
    if args.use_ema and not has_ema:
        raise UserError(f"--use-ema: '{args.checkpoint}' holds no EMA weights (no state_dict_ema); "
                        f"leave out --use-ema to evaluate its weights.")
    sd = remap_checkpoint(extract_state_dict(ckpt, use_ema=args.use_ema, path=args.checkpoint), model)
    check_compatible(model, sd, args.checkpoint, args.model)
    model.load_state_dict(sd)
    _logger.info(f"Loaded {'the EMA weights (state_dict_ema)' if args.use_ema else 'the weights'} "
                 f"of '{args.checkpoint}'.")


class _ValidLabels(torch.nn.Module):
    """Scores only the listed classes (timm's --valid-labels): label i of the dataset is class valid[i]."""

    def __init__(self, model: torch.nn.Module, valid: List[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer('valid', torch.tensor(valid, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.valid]


class _RecordReal(torch.nn.Module):
    """Passes the logits on and scores each batch against the ImageNet ReaL labels, in dataset order."""

    def __init__(self, model: torch.nn.Module, real: RealLabelsImagenet) -> None:
        super().__init__()
        self.model, self.real = model, real

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.real.add_result(out.float())
        return out


def _read_valid_labels(path: str, num_classes: int) -> List[int]:
    try:
        with open(path) as f:
            valid = [int(line) for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read --valid-labels '{path}': {e.strerror}.") from None
    except ValueError:
        raise UserError(f"--valid-labels '{path}' must hold one class index per line.") from None
    bad = [i for i in valid if not 0 <= i < num_classes]
    if not valid or bad:
        raise UserError(f"--valid-labels '{path}': indices must lie in [0, {num_classes}), got {bad[:5] or 'none'}.")
    return valid


def _real_labels(dataset, path: str, num_classes: int) -> RealLabelsImagenet:
    filenames = dataset.filenames(basename=True) if hasattr(dataset, 'filenames') else None
    if not filenames:
        raise UserError('--real-labels needs a folder dataset whose file names are the ImageNet validation names.')
    try:
        with open(path) as f:
            entries = len(json.load(f))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read --real-labels '{path}': {e}.") from None
    if entries != len(filenames):
        raise UserError(f"--real-labels '{path}' has {entries} entries but the split has {len(filenames)} images.")
    try:
        return RealLabelsImagenet(filenames, real_json=path, topk=(1, min(5, num_classes)))
    except KeyError as e:
        raise UserError(f'--real-labels: image {e} is not an ImageNet validation file name '
                        f'(ILSVRC2012_val_NNNNNNNN.JPEG).') from None


def _write_results(results: Dict[str, Any], path: str, fmt: str) -> None:
    if fmt == 'csv':
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(results))
        writer.writeheader()
        writer.writerow(results)
        atomic_write_text(buf.getvalue(), path)
    else:
        atomic_write_text(json.dumps(results, indent=2) + '\n', path)
    _logger.info(f'Results written to {path}')


def validate(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    for message in refused_in_use(build_parser(), args, REFUSED):
        raise UserError(message)
    setup_logging(True)
    model_dtype = prepare_runtime(args)
    random_seed(args.seed)
    data_dir = args.data or args.data_dir
    if not args.model:
        raise UserError('no model given: pass --model NAME.')
    if args.results_file:
        check_writable_file(args.results_file, '--results-file')  # now, not after the evaluation

    ckpt = safe_load(args.checkpoint) if args.checkpoint else None
    kwargs, img_size = _model_kwargs(args, _arch_from_checkpoint(ckpt))
    trained_classes = ckpt.get('class_names') if isinstance(ckpt, dict) else None  # recorded by noah-train
    if not (isinstance(trained_classes, (list, tuple)) and trained_classes
            and all(isinstance(n, str) for n in trained_classes)):
        trained_classes = None
    device = torch.device(resolve_device(args.device))
    dataset = build_dataset(
        args.dataset, data_dir, args.split, is_training=False, class_map=args.class_map,
        input_img_mode=args.input_img_mode, download=args.dataset_download, num_samples=args.num_samples,
        trust_remote_code=args.dataset_trust_remote_code, classes=trained_classes,
        classes_from=f"checkpoint '{args.checkpoint}'",
        **{k: v for k, v in dict(input_key=args.input_key, target_key=args.target_key).items() if v is not None})

    model = create_model_checked(args.model, pretrained_path=args.pretrained_path, adapt_pretrained_head=False, **kwargs)
    if ckpt is not None:
        _load_checkpoint_weights(model, ckpt, args)
    if args.reparam:
        model = reparameterize_model(model)
    n_cls = getattr(model, 'num_classes', None)
    valid = _read_valid_labels(args.valid_labels, n_cls) if args.valid_labels else None
    labels = class_names(dataset)
    scored = len(valid) if valid else n_cls
    if labels and scored and len(labels) > scored:
        raise UserError(f'the dataset has {len(labels)} classes but the model predicts {scored}: '
                        f'pass --num-classes or a matching checkpoint.')

    data_cfg_args = dict(vars(args))
    if img_size is not None:
        data_cfg_args['img_size'] = img_size
    data_config = resolve_data_config_checked(data_cfg_args, model, args.model, use_test_size=not args.use_train_size)
    model.to(device=device, dtype=model_dtype).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    run_model = model
    if valid:
        run_model = _ValidLabels(run_model, valid).to(device)
    real = _real_labels(dataset, args.real_labels, scored) if args.real_labels else None
    if args.torchcompile:
        run_model = torch.compile(run_model, backend=args.torchcompile, mode=args.torchcompile_mode)
    if real is not None:
        run_model = _RecordReal(run_model, real)
    amp_dtype = args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')
    autocast = amp_autocast(device, args.amp, amp_dtype)
    workers = max(0, args.workers)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=workers, crop_pct=data_config['crop_pct'], crop_mode=data_config['crop_mode'],
        crop_border_pixels=args.crop_border_pixels, pin_memory=args.pin_mem, device=device,
        img_dtype=model_dtype or torch.float32, use_prefetcher=not args.no_prefetcher, persistent_workers=False)
    t0 = time.time()
    metrics = evaluate(run_model, _cast_inputs(loader, model_dtype) if args.no_prefetcher else loader, args, device,
                       autocast, False, 0, 1, len(dataset), args.no_prefetcher, args.channels_last)
    elapsed = time.time() - t0
    results = dict(
        model=args.model, checkpoint=args.checkpoint or None, top1=round(metrics['top1'], 4),
        top1_err=round(100 - metrics['top1'], 4), top5=round(metrics['top5'], 4),
        top5_err=round(100 - metrics['top5'], 4), loss=round(metrics['loss'], 6), images=metrics['count'],
        param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        img_size=data_config['input_size'][-1], crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'], use_ema=args.use_ema, amp=args.amp)
    if real is not None:
        results.update(real_top1=round(real.get_accuracy(1), 4), real_top5=round(real.get_accuracy(real.topk[-1]), 4))
    _logger.info(f"* {args.model}: top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}%  "
                 f"loss {results['loss']:.4f}  ({results['images']} images, {elapsed:.1f} s, "
                 f"{results['img_size']} px, crop {results['crop_pct']})")
    if real is not None:
        _logger.info(f"* ReaL labels: top-1 {results['real_top1']:.2f}%  top-5 {results['real_top5']:.2f}%")
    if args.results_file:
        _write_results(results, args.results_file, args.results_format)
    return results


def _cast_inputs(loader, dtype: Optional[torch.dtype]):
    """Without the prefetcher, images arrive as float32: cast them to --model-dtype."""
    if dtype is None:
        return loader
    return ((x.to(dtype), y) for x, y in loader)


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main(lambda: (validate(argv), 0)[1])


if __name__ == '__main__':
    sys.exit(main())
