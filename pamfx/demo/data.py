"""Fashion-MNIST from Debian's package dataset-fashion-mnist, and tasks defined as label functions on it.

The images are read from gzipped IDX files (the format of the original MNIST distribution) in
/usr/share/datasets/fashion-mnist, or the directory named by $PAMFX_FASHION_MNIST, or a `root=` argument.
Every task of a scenario sees the same images; a task differs only by how it labels them (`LabelFunction`).
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pamfx.errors import DataError, DatasetMissingError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "PAMFX_FASHION_MNIST"
PACKAGE = "dataset-fashion-mnist"

# Mean and std of the training images after scaling to [0, 1]; every model in pamfx sees inputs normalised so.
MEAN = 0.2860
STD = 0.3530

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# split -> (images file, labels file), as the package names them.
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX type byte -> big-endian numpy dtype (the format's table; Fashion-MNIST uses only 0x08).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------------------------- loading

def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read one gzipped IDX file into a numpy array, exactly as stored.

    Takes the path of a `.gz` file and optionally the number of dimensions the caller expects.
    Returns an array of the file's dtype (uint8 for Fashion-MNIST) and shape.
    Raises DataError, naming the file, when it is not gzip, is truncated, has a bad magic number,
    or holds a different number of dimensions or bytes than its header says.
    """
    path = Path(path)
    fix = f"the file is corrupt: reinstall it (apt-get install --reinstall -y {PACKAGE}) or replace it"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file '{path}' ({e}); {fix}") from e

    if len(raw) < 4:
        raise DataError(f"IDX file '{path}' holds {len(raw)} bytes, too few for a header; {fix}")
    zero, type_code, file_ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code not in _IDX_DTYPES:
        raise DataError(f"IDX file '{path}' has bad magic number 0x{raw[:4].hex()} "
                        f"(expected 0x0000TTNN with type TT in {sorted(hex(t) for t in _IDX_DTYPES)}); {fix}")
    if ndim is not None and file_ndim != ndim:
        raise DataError(f"IDX file '{path}' has {file_ndim} dimensions, expected {ndim} "
                        f"(magic 0x{raw[:4].hex()}); {fix}")

    header_end = 4 + 4 * file_ndim
    if len(raw) < header_end:
        raise DataError(f"IDX file '{path}' ends inside its header; {fix}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(file_ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise DataError(f"IDX file '{path}' holds {len(raw) - header_end} data bytes, but its header "
                        f"shape {shape} needs {expected}; {fix}")
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)


def dataset_root(root: str | os.PathLike | None = None) -> Path:
    """The Fashion-MNIST directory: `root` if given, else $PAMFX_FASHION_MNIST if set, else the package's."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None,
                       limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Load one split of Fashion-MNIST, normalised, as tensors.

    Takes `split` ("train": 60000 samples, "test": 10000), the directory `root` (see `dataset_root`),
    and `limit`, the number of leading samples to keep (all of them if the split has fewer; None keeps all).
    Returns (images, labels): images float32 [N, 1, 28, 28], scaled to [0, 1] then normalised with
    MEAN and STD; labels int64 [N] in 0..9 (see CLASS_NAMES).
    Raises ValueError for an unknown split or a limit below 1, DatasetMissingError when a file is
    not on disk, DataError when a file is corrupt.
    """
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}: use one of {sorted(_FILES)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")

    paths = tuple(dataset_root(root) / name for name in _FILES[split])
    for path in paths:
        if not path.is_file():
            raise DatasetMissingError(
                f"Fashion-MNIST file '{path}' is missing (it comes with Debian's package {PACKAGE}); "
                f"install it with `apt-get install -y {PACKAGE}`, or set {ENV_VAR} to a directory "
                f"holding {', '.join(sorted(n for pair in _FILES.values() for n in pair))}")
    # Size and mtime join the cache key so a file replaced on disk is read again.
    stamps = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    images, labels = _read_split(stamps)

    images, labels = images[:limit], labels[:limit]
    # astype copies, so callers never share memory with the cached arrays.
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# NOTE: the cache holds raw uint8 arrays (47 MB for train) of at most four splits, keyed by file
# identity; it never grows past that, and each call converts its own float copy.
@functools.lru_cache(maxsize=4)
def _read_split(stamps: tuple[tuple[str, int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check one split's (images, labels) files; `stamps` are (path, size, mtime) of each."""
    images_path, labels_path = stamps[0][0], stamps[1][0]
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DataError(f"Fashion-MNIST files '{images_path}' and '{labels_path}' must hold unsigned bytes, "
                        f"got {images.dtype} and {labels.dtype}; replace them with the package's files")
    if images.shape[1:] != (28, 28):
        raise DataError(f"Fashion-MNIST images in '{images_path}' are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise DataError(f"'{images_path}' holds {len(images)} images but '{labels_path}' holds "
                        f"{len(labels)} labels; the two files must come from the same split")
    if len(labels) and labels.max() >= len(CLASS_NAMES):
        raise DataError(f"'{labels_path}' holds label {int(labels.max())}; Fashion-MNIST labels are "
                        f"0..{len(CLASS_NAMES) - 1}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


# ------------------------------------------------------------------------------------------------ tasks

@dataclass(frozen=True)
class LabelFunction:
    """How one task labels the images: maps Fashion-MNIST labels [N] to task labels in 0..num_classes-1, or with
    `multilabel` to 0/1 attributes [N, num_classes] (num_classes is then the number of attributes: the head's width).
    """

    num_classes: int
    fn: Callable[[Tensor], Tensor]
    multilabel: bool = False

    def __post_init__(self):
        least = 1 if self.multilabel else 2
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < least:
            raise ValueError(f"a task needs num_classes >= {least} (an int), got {self.num_classes!r}")
        if not callable(self.fn):
            raise TypeError(f"LabelFunction.fn must be callable, got {type(self.fn).__name__}")

    def __call__(self, labels: Tensor) -> Tensor:
        return self.fn(labels)


def _relabel(labels: Tensor, table: tuple[int, ...]) -> Tensor:
    """Map each label l to table[l]; a module-level function so a LabelFunction pickles."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(table)):
        raise DataError(f"labels must lie in 0..{len(table) - 1}, got {int(labels.min())}..{int(labels.max())}")
    return torch.tensor(table, dtype=torch.int64)[labels.long()]


def class_group_task(classes: Iterable[int], num_source_classes: int = len(CLASS_NAMES)) -> LabelFunction:
    """A task that tells apart `classes` and lumps every other class into 'other'.

    Takes the source classes of interest, in order, and the number of source classes.
    Returns a LabelFunction with len(classes) + 1 outputs: classes[i] -> i, any other class -> len(classes).
    Raises ValueError for an empty list, a repeated class or one outside 0..num_source_classes-1.
    Example: class_group_task([5, 6])(tensor([6, 0, 5])) == tensor([1, 2, 0]).
    """
    classes = tuple(classes)
    if not classes:
        raise ValueError("class_group_task needs at least one class")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes {classes} repeat a class")
    outside = [c for c in classes if not 0 <= c < num_source_classes]
    if outside:
        raise ValueError(f"classes {outside} are outside 0..{num_source_classes - 1}")
    other = len(classes)
    table = tuple(classes.index(c) if c in classes else other for c in range(num_source_classes))
    return LabelFunction(num_classes=other + 1, fn=functools.partial(_relabel, table=table))


def partition_task(blocks: Iterable[Iterable[int]], num_source_classes: int = len(CLASS_NAMES)) -> LabelFunction:
    """A task that tells apart super-classes: `blocks` partitions the source classes, and a class in blocks[k] is
    labelled k. Raises ValueError unless the blocks cover every source class exactly once.
    Example: partition_task([[0, 1], [2]], 3)(tensor([2, 0, 1])) == tensor([1, 0, 0]).
    """
    blocks = [tuple(block) for block in blocks]
    flat = sorted(c for block in blocks for c in block)
    if flat != list(range(num_source_classes)) or any(not block for block in blocks):
        raise ValueError(f"blocks {blocks} must split the classes 0..{num_source_classes - 1} into non-empty parts, "
                         "each class in exactly one")
    table = tuple(next(k for k, block in enumerate(blocks) if c in block) for c in range(num_source_classes))
    return LabelFunction(num_classes=len(blocks), fn=functools.partial(_relabel, table=table))


def attribute_task(attributes: Iterable[Iterable[int]], num_source_classes: int = len(CLASS_NAMES)) -> LabelFunction:
    """A multi-label task of binary attributes: attribute k is 1 for the source classes in attributes[k], else 0.

    Returns a LabelFunction (multilabel=True) with one output per attribute, mapping labels [N] to 0/1 [N, k].
    Raises ValueError for no attributes or a class outside 0..num_source_classes-1.
    Example: attribute_task([[0, 2], [1]], 3)(tensor([2, 1])) == tensor([[1, 0], [0, 1]]).
    """
    attributes = [frozenset(classes) for classes in attributes]
    if not attributes:
        raise ValueError("attribute_task needs at least one attribute")
    outside = sorted(c for classes in attributes for c in classes if not 0 <= c < num_source_classes)
    if outside:
        raise ValueError(f"classes {outside} are outside 0..{num_source_classes - 1}")
    table = tuple(tuple(int(c in classes) for classes in attributes) for c in range(num_source_classes))
    return LabelFunction(num_classes=len(attributes), fn=functools.partial(_relabel, table=table), multilabel=True)


def paper_split() -> dict[str, LabelFunction]:
    """The PAM paper's scenario: "classes_0_4" and "classes_5_9", each a 6-way task (its five classes or 'other').

    Returns task name -> LabelFunction; label k of a task is its k-th class, label 5 is 'other'.
    """
    return {
        "classes_0_4": class_group_task(range(0, 5)),
        "classes_5_9": class_group_task(range(5, 10)),
    }


def task_data(images: Tensor, labels: Tensor,
              label_fns: Mapping[str, LabelFunction]) -> dict[str, tuple[Tensor, Tensor]]:
    """Label the same images once per task.

    Takes images [N, ...], source labels [N] and task name -> LabelFunction.
    Returns task name -> (images, task labels); the images tensor is shared, not copied.
    Raises DataError when images and labels differ in length, or a label function returns labels of
    another shape or outside 0..num_classes-1 (0/1 for a multi-label task), naming the task.
    """
    if len(images) != len(labels):
        raise DataError(f"task_data got {len(images)} images but {len(labels)} labels; pass one label per image")
    data = {}
    for name, label_fn in label_fns.items():
        task_labels = label_fn(labels)
        multilabel = label_fn.multilabel
        shape = (len(labels), label_fn.num_classes) if multilabel else tuple(labels.shape)
        if tuple(task_labels.shape) != shape:
            wanted = f"{label_fn.num_classes} attributes per sample" if multilabel else "one label per sample"
            raise DataError(f"label function of task '{name}' returned shape {tuple(task_labels.shape)} "
                            f"for labels of shape {tuple(labels.shape)}; it must return {wanted}")
        top = 2 if multilabel else label_fn.num_classes
        if task_labels.numel() and (int(task_labels.min()) < 0 or int(task_labels.max()) >= top):
            raise DataError(f"label function of task '{name}' returned labels "
                            f"{int(task_labels.min())}..{int(task_labels.max())}, outside "
                            f"0..{top - 1}; fix the function or its num_classes")
        data[name] = (images, task_labels.long())
    return data
