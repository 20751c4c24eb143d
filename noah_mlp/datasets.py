"""Dataset creation on timm's create_dataset, with clear errors and strict image reading.

timm's ImageDataset skips an unreadable image with a warning and serves the next one; here an
unreadable image stops the run with a message that names the file.
"""
import os
from typing import Optional

from PIL import Image, UnidentifiedImageError
from timm.data import create_dataset
from timm.data.dataset import ImageDataset

from .errors import UserError

__all__ = ['find_split_dir', 'build_dataset', 'StrictImageDataset']

_TRAIN_NAMES = ('train', 'training')
_EVAL_NAMES = ('val', 'valid', 'validation', 'eval', 'evaluation', 'test')


class StrictImageDataset(ImageDataset):
    """ImageDataset that fails on an unreadable image, naming the file, instead of skipping it."""

    def __getitem__(self, index):
        img, target, *features = self.reader[index]
        try:
            if self.load_bytes:
                img = img.read()
            else:
                img = Image.open(img)
                if self.input_img_mode:
                    img = img.convert(self.input_img_mode)
        except (OSError, ValueError, SyntaxError) as e:
            name = self.reader.filename(index, absolute=True)
            if isinstance(e, UnidentifiedImageError):
                detail = 'not an image, or an unknown or corrupt image format'
            else:
                detail = f'{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else "read failed"}'
            err = UserError(f"cannot read image '{name}': {detail}.")
            err.all_ranks = False
            raise err from None
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        if self.additional_features is None:
            return img, target
        return img, target, *features


def _is_folder_dataset(name: str) -> bool:
    return not name or name.lower().startswith(('folder', 'imagefolder', 'image_folder'))


def find_split_dir(root: str, split: str) -> str:
    """The folder of `split` under `root` (``val`` or ``validation`` for either), or a UserError."""
    if not root:
        raise UserError('no dataset given: pass the dataset folder as the first argument or with --data-dir.')
    if not os.path.isdir(root):
        raise UserError(f"dataset folder '{root}' does not exist." if not os.path.exists(root)
                        else f"dataset path '{root}' is not a folder.")
    split_name = split.split('[')[0]
    names = [split_name]
    if split_name in _TRAIN_NAMES:
        names += [n for n in _TRAIN_NAMES if n != split_name]
    elif split_name in _EVAL_NAMES:
        names += [n for n in _EVAL_NAMES if n != split_name]
    for n in names:
        path = os.path.join(root, n)
        if os.path.isdir(path):
            return path
    have = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise UserError(
        f"dataset folder '{root}' has no '{split_name}' split (looked for {', '.join(repr(n) for n in names)}; "
        f"found {', '.join(repr(d) for d in have) if have else 'no sub-folders'}). "
        f"An ImageFolder dataset needs train/ and val/ (or validation/) class sub-folders.")


def build_dataset(
        name: str,
        root: str,
        split: str,
        is_training: bool,
        class_map: str = '',
        batch_size: int = 1,
        seed: int = 42,
        repeats: float = 0,
        input_img_mode: str = 'RGB',
        **kwargs,
):
    """create_dataset with a checked split folder for ImageFolder datasets, strict about unreadable images."""
    if class_map and not os.path.isfile(class_map):
        raise UserError(f"class map '{class_map}' does not exist.")
    if _is_folder_dataset(name):
        kwargs.pop('download', None)
        split_dir = find_split_dir(root, split)
        try:
            dataset = create_dataset(
                name, root=split_dir, split=split, search_split=False, class_map=class_map or None,
                is_training=is_training, input_img_mode=input_img_mode, **kwargs)
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot read dataset folder '{split_dir}': {str(e).splitlines()[0]}") from None
        if len(dataset) == 0:
            raise UserError(f"dataset folder '{split_dir}' holds no images (expected one sub-folder of images per class).")
        if type(dataset) is ImageDataset:
            dataset.__class__ = StrictImageDataset
        return dataset
    try:
        return create_dataset(
            name, root=root, split=split, search_split=True, class_map=class_map or None, is_training=is_training,
            batch_size=batch_size, seed=seed, repeats=repeats, input_img_mode=input_img_mode, **kwargs)
    except (FileNotFoundError, ImportError, AssertionError, RuntimeError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot create dataset '{name}' from '{root}': {first}") from None


def class_names(dataset) -> Optional[list]:
    """Class names in label order, where the dataset's reader knows them."""
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None)
    if not class_to_idx:
        return None
    return [name for name, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
