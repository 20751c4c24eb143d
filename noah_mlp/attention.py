"""Per-class attention maps of a NOAH head (the paper's pairwise object category attentions, POCAs).

For every group n and class k the NOAH head softmaxes a score over the image's tokens and sums the
tokens' class evidence under that softmax. The softmax is a map of where the model looks for class k:

    maps = attention_maps(model, images)               # (B, N, 1, H', W'), each image's top-1 class
    maps = attention_maps(model, images, classes=[3])  # (B, N, 1, H', W'), class 3 for every image

`noah_attention` returns the same maps together with the per-token class evidence (values), the
logits and the chosen classes, which is what the pictures of `noah_mlp.visualize` are drawn from.
The maps are computed from the head's own parameters on the model's own final tokens, in eval mode
(no dropout), so they are exactly the weights the head used for its output:

    logits[b, k] = sum_n sum_{h,w} maps[b, n, k, h, w] * values[b, n, k, h, w]
"""
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .adapt import NoahAdapted
from .head import NoahHead
from .sharing import model_input_size

__all__ = ['NoahAttention', 'attention_maps', 'noah_attention', 'noah_head_of', 'token_grid']

ClassSpec = Union[None, int, Sequence[int], torch.Tensor]

# largest (B, N, K, L) score block materialised at once; larger batches are processed in chunks
_MAX_SCORE_ELEMENTS = 1 << 25


class NoahAttention(NamedTuple):
    """What the NOAH head did for a batch, restricted to some classes.

    maps: (B, N, k, H', W') softmax attention of each group over the token grid (sums to 1 per map).
    values: (B, N, k, H', W') each token's class evidence v[b, n, k, l] (the value projection).
    classes: (B, k) the class index of every slot of the class dimension, per image.
    logits: (B, K) the model's output (eval mode) for all classes.
    """
    maps: torch.Tensor
    values: torch.Tensor
    classes: torch.Tensor
    logits: torch.Tensor


def noah_head_of(model: nn.Module) -> NoahHead:
    """The NoahHead of a NOAH model (registered or made by `add_noah_head`), or a TypeError saying why not."""
    adapted = isinstance(model, NoahAdapted)
    head = model.noah_head if adapted else getattr(model, 'head', None)
    if not isinstance(head, NoahHead):
        kind = type(head).__name__ if head is not None else 'no `head`'
        raise TypeError(
            f'{type(model).__name__} is not a NOAH model: its head is {kind}, not a NoahHead '
            f"(create one with timm.create_model('noah_...') after `import noah_mlp`, or noah_mlp.add_noah_head; "
            f'a model made with num_classes=0 has no head and no attention maps).')
    for attr in ('forward_features',) if adapted else ('forward_features', 'stem'):
        if not hasattr(model, attr):
            raise TypeError(f'{type(model).__name__} has a NoahHead but no `{attr}`: expected a NoahMlpMixer.')
    return head


def token_grid(model: nn.Module, image_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """(H', W'): the grid the model's tokens come from (H' * W' = number of tokens) for images of
    `image_size` (default: the size the model was built / configured for)."""
    if isinstance(model, NoahAdapted):
        return model.noah_token_grid(image_size or model_input_size(model)[1:])
    grid = getattr(model.stem, 'grid_size', None)
    if grid is None:
        raise TypeError(f'{type(model).__name__}.stem has no grid_size: cannot lay the tokens out as an image.')
    return int(grid[0]), int(grid[1])


def _check_images(model: nn.Module, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f'images must be a tensor (B, C, H, W), got {type(images).__name__}.')
    if images.ndim != 4:
        raise ValueError(f'images must be a batch (B, C, H, W), got shape {tuple(images.shape)}.')
    if images.shape[0] == 0:
        raise ValueError('images is an empty batch.')
    stem = getattr(model, 'stem', None) or getattr(model, 'patch_embed', None)
    proj = getattr(stem, 'proj', None)
    in_chans = getattr(proj, 'in_channels', None)
    if in_chans is not None and images.shape[1] != in_chans:
        raise ValueError(f'images have {images.shape[1]} channels, the model was built for {in_chans}.')
    img_size = getattr(stem, 'img_size', None) if getattr(stem, 'strict_img_size', True) else None
    if img_size is not None and tuple(images.shape[-2:]) != tuple(img_size):
        raise ValueError(
            f'images are {images.shape[-2]}x{images.shape[-1]} but the model was built for '
            f'{img_size[0]}x{img_size[1]}: resize/crop them to that size, or create the model with '
            f'img_size={images.shape[-2] if images.shape[-2] == images.shape[-1] else tuple(images.shape[-2:])}.')


def _class_index(classes: ClassSpec, batch: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """Normalise `classes` to a (B, k) long tensor of valid class indices."""
    if isinstance(classes, torch.Tensor):
        idx = classes.detach().to(device=device)
    else:
        if isinstance(classes, int):
            classes = [classes]
        try:
            idx = torch.as_tensor(list(classes), device=device)
        except (TypeError, ValueError) as e:
            raise TypeError(f'classes must be None, an int, a sequence of ints or a tensor, got {classes!r}.') from e
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
        raise TypeError(f'class indices must be integers, got dtype {idx.dtype}.')
    idx = idx.long()
    if idx.ndim == 0:
        idx = idx.reshape(1)
    if idx.ndim == 1:
        idx = idx.unsqueeze(0).expand(batch, -1)
    elif idx.ndim != 2 or idx.shape[0] != batch:
        raise ValueError(
            f'classes must be 1-D (shared by all images) or ({batch}, k) (per image), got shape {tuple(idx.shape)}.')
    if idx.shape[1] == 0:
        raise ValueError('classes is empty.')
    if idx.min() < 0 or idx.max() >= num_classes:
        raise ValueError(f'class indices must lie in [0, {num_classes}), got {idx.unique().tolist()}.')
    return idx


class _EvalMode:
    """Puts every module in eval mode and restores each module's own flag afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved = []

    def __enter__(self) -> nn.Module:
        self.saved = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        for module, flag in self.saved:
            module.training = flag


def _tokens_and_logits(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int], torch.Tensor]:
    """The final tokens (B, L, C) the head attends over, their grid and the logits."""
    features = model.forward_features(images)
    logits = model.forward_head(features)  # dropout is identity in eval
    if isinstance(model, NoahAdapted):
        tokens, grid = model.forward_noah_tokens(features)
        grid = grid or token_grid(model, tuple(images.shape[-2:]))
    else:
        tokens, grid = features, token_grid(model)  # NoahMlpMixer: final-normed tokens
    if tokens.ndim != 3 or tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            f'the model gave tokens of shape {tuple(tokens.shape)}, expected (B, {grid[0] * grid[1]}, C).')
    return tokens, grid, logits


@torch.no_grad()
def noah_attention(
        model: nn.Module,
        images: torch.Tensor,
        classes: ClassSpec = None,
        topk: int = 1,
) -> NoahAttention:
    """Attention maps, token values and logits of a NOAH model for a batch of images.

    Args:
        model: a NOAH model (`timm.create_model('noah_...')`). Its train/eval flags are left as found.
        images: (B, C, H, W), preprocessed as the model expects, at the size it was built for.
        classes: None for each image's `topk` highest-scoring classes (best first); an int, a sequence
            or a 1-D tensor of class indices shared by all images; or a (B, k) tensor, classes per image.
        topk: how many predicted classes to take when `classes` is None.

    Returns:
        NoahAttention(maps, values, classes, logits); maps and values are float32 (B, N, k, H', W').
    """
    head = noah_head_of(model)
    _check_images(model, images)
    B = images.shape[0]
    K, N = head.num_classes, head.num_heads
    with _EvalMode(model):
        tokens, (gh, gw), logits = _tokens_and_logits(model, images)
        if classes is None:
            if not 1 <= topk <= K:
                raise ValueError(f'topk must lie in [1, {K}], got {topk}.')
            idx = logits.topk(topk, dim=-1).indices
        else:
            idx = _class_index(classes, B, K, images.device)
        k = idx.shape[1]

        # the head's own scores q[b, n, k, l], in batch chunks so (b, N, K, L) stays bounded
        step = max(1, _MAX_SCORE_ELEMENTS // (N * K * tokens.shape[1]))
        maps = []
        for start in range(0, B, step):
            scores = head.attention_logits(tokens[start:start + step])  # (b, N, K, L)
            sel = idx[start:start + step, None, :, None].expand(-1, N, -1, scores.shape[-1])
            scores = scores.gather(2, sel)
            maps.append(scores.float().softmax(dim=-1))
        maps = torch.cat(maps, dim=0)

        # per-token class evidence v[b, n, k, l] for the chosen classes
        _, xv = head._split_tokens(tokens)  # (B, N, L, dv)
        wv, bv = head.class_values()  # (N, K, dv), (N, K)
        wv_sel = wv[:, idx].permute(1, 0, 2, 3).to(xv.dtype)  # (B, N, k, dv)
        bv_sel = bv[:, idx].permute(1, 0, 2).to(xv.dtype)  # (B, N, k)
        values = torch.einsum('bnld,bnkd->bnkl', xv, wv_sel) + bv_sel[..., None]

    shape = (B, N, k, gh, gw)
    return NoahAttention(
        maps=maps.reshape(shape),
        values=values.float().reshape(shape),
        classes=idx,
        logits=logits,
    )


def attention_maps(model: nn.Module, images: torch.Tensor, classes: ClassSpec = None) -> torch.Tensor:
    """Softmax attention of each NOAH group over the token grid: (B, N, len(classes), H', W').

    Each map sums to 1 over (H', W') and is the weighting the head really used for its logits.
    `classes=None` takes each image's top-1 predicted class (class dimension 1); a list, int or 1-D
    tensor of indices is shared by all images; a (B, k) tensor gives each image its own classes.
    The model must be a NOAH model and `images` (B, C, H, W) must have the size it was built for.
    Runs without gradients in eval mode and leaves the model's train/eval state as it was.
    """
    return noah_attention(model, images, classes=classes).maps
