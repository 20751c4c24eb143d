"""Dataset creation on timm's create_dataset, with clear errors, strict image reading and one class list.

timm's ImageDataset skips an unreadable image with a warning and serves the next one; here an
unreadable image stops the run with a message that names the file.

timm numbers the classes of each ImageFolder split on its own (sorted folder names), so a class
folder missing from val/ would shift every later label. Here an evaluation split is numbered by
the training classes (`build_dataset(..., classes=...)`), and a class the model never saw is
refused before any work.
"""
import logging
import os
from typing import Optional, Sequence

from PIL import Image, UnidentifiedImageError
from timm.data import create_dataset
from timm.data.dataset import ImageDataset
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader_image_folder import ReaderImageFolder

from .errors import UserError

__all__ = ['find_split_dir', 'build_dataset', 'StrictImageDataset', 'class_names']

_logger = logging.getLogger('noah_mlp.datasets')

_TRAIN_NAMES = ('train', 'training')
_EVAL_NAMES = ('val', 'valid', 'validation', 'eval', 'evaluation', 'test')


class StrictImageDataset(ImageDataset):
    """ImageDataset that fails on an unreadable image, naming the file, instead of skipping it."""

    def __getitem__(self, index):
        try:
            img, target, *features = self.reader[index]  # opens the file: permission, dangling link
            if self.load_bytes:
                img = img.read()
            else:
                img = Image.open(img)
                if self.input_img_mode:
                    img = img.convert(self.input_img_mode)  # decodes: truncated or corrupt data
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise self._unreadable(index, e) from None
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        if self.additional_features is None:
            return img, target
        return img, target, *features

    def _unreadable(self, index: int, e: BaseException) -> UserError:
        name = self.reader.filename(index, absolute=True)
        if isinstance(e, UnidentifiedImageError):
            detail = 'not an image, or an unknown or corrupt image format'
        elif isinstance(e, OSError) and e.strerror:
            detail = e.strerror  # 'Permission denied'; 'No such file or directory' for a dangling link
        else:
            detail = f'{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else "read failed"}'
        err = UserError(f"cannot read image '{name}': {detail}.")
        err.all_ranks = False  # only the process that read it knows
        return err


def _listed(names: Sequence[str], limit: int = 8) -> str:
    shown = ', '.join(repr(n) for n in names[:limit])
    return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')


def _check_class_folders(reader: ReaderImageFolder, split_dir: str) -> None:
    """An ImageFolder split is one sub-folder of images per class: refuse loose images and empty class folders."""
    if '' in reader.class_to_idx:  # timm labels files directly in the split folder with the class ''
        loose = sorted(os.path.basename(f) for f, t in reader.samples if t == reader.class_to_idx[''])
        raise UserError(f"'{split_dir}' holds images directly ({_listed(loose, 3)}): put each class's images in "
                        f"a sub-folder named after the class.")
    used = {os.path.relpath(f, split_dir).split(os.sep)[0] for f, _ in reader.samples}
    folders = sorted(d for d in os.listdir(split_dir)
                     if not d.startswith('.') and os.path.isdir(os.path.join(split_dir, d)))
    empty = [d for d in folders if d not in used]
    if empty:
        raise UserError(f"class folder(s) {_listed(empty)} in '{split_dir}' hold no images "
                        f"({', '.join(sorted(get_img_extensions()))}): a class without training images cannot be "
                        f"learnt; add images or remove the folder(s).")
    if len(reader.class_to_idx) == 1:
        _logger.warning(f"note: '{split_dir}' has a single class folder: every image has the same label, so there "
                        f"is nothing to tell apart.")


def _number_by_classes(reader: ReaderImageFolder, classes: Sequence[str], split_dir: str, source: str) -> None:
    """Relabel `reader`'s samples with the indices of `classes` (the classes the model was trained on)."""
    index = {name: i for i, name in enumerate(classes)}
    own = reader.class_to_idx
    unknown = sorted(set(own) - set(index))
    if unknown:
        shown = ['(images directly in the split folder)' if n == '' else n for n in unknown]
        raise UserError(f"'{split_dir}' has {len(unknown)} class folder(s) the model was not trained on: "
                        f"{_listed(shown)}; {source} has {len(classes)} classes. Evaluate on folders named as "
                        f"the training classes.")
    missing = [name for name in classes if name not in own]
    if missing:
        _logger.warning(f"note: {len(missing)} of the {len(classes)} training classes have no images in "
                        f"'{split_dir}' ({_listed(missing)}): evaluation covers the other {len(own)}, with the "
                        f"training labels.")
    name_of = {i: name for name, i in own.items()}
    reader.samples = [(f, index[name_of[t]]) for f, t in reader.samples]
    reader.class_to_idx = dict(index)


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
        classes: Optional[Sequence[str]] = None,
        classes_from: str = 'the training split',
        **kwargs,
):
    """create_dataset with a checked split folder for ImageFolder datasets, strict about unreadable images.

    `classes`: the class names the model was trained on, in label order; an ImageFolder split is then
    numbered by them (a class folder outside them is refused, naming `classes_from`). Without them a
    training split is checked for one non-empty folder per class.
    """
    if class_map and not os.path.isfile(class_map):
        raise UserError(f"class map '{class_map}' does not exist.")
    if _is_folder_dataset(name):
        kwargs.pop('download', None)
        split_dir = find_split_dir(root, split)
        try:
            dataset = create_dataset(
                name, root=split_dir, split=split, search_split=False, class_map=class_map or None,
                is_training=is_training, input_img_mode=input_img_mode, **kwargs)
        except (FileNotFoundError, RuntimeError, ValueError, AssertionError) as e:  # timm asserts on class maps
            first = (str(e).splitlines() or [type(e).__name__])[0]
            using = f" with class map '{class_map}'" if class_map else ''
            raise UserError(f"cannot read dataset folder '{split_dir}'{using}: {first}") from None
        if len(dataset) == 0:
            raise UserError(f"dataset folder '{split_dir}' holds no images (expected one sub-folder of images per class).")
        if type(dataset) is ImageDataset:
            dataset.__class__ = StrictImageDataset
        reader = getattr(dataset, 'reader', None)
        if isinstance(reader, ReaderImageFolder) and not class_map:
            if classes is not None:
                _number_by_classes(reader, classes, split_dir, classes_from)
            elif is_training:
                _check_class_folders(reader, split_dir)
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
