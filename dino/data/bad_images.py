"""Images that cannot be decoded (a JPEG cut short, a file that is not an image): `data.on_bad_image`.

Real image folders have a few such files (ImageNet does). `fail` stops with one line naming the file;
`skip` (the default) uses the next readable image of the dataset in its place, so the replacement
depends only on which files are bad: a resumed run and an uninterrupted one see the same batches, with
any number of loader workers. Each skip is a warning naming the file (train.log), and the number of
skips is shared by the loader worker processes (`count`, one integer in shared memory) so the train
loop can report it in the run's metrics (`skipped_images`). Decodable oddities (CMYK, greyscale,
PNG bytes in a .JPEG file) are not bad: `decode_image` converts them to RGB.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from typing import TypeVar

from dino.config.schema import BAD_IMAGE_MODES
from dino.io.storage import StorageError

log = logging.getLogger("dino.data")
T = TypeVar("T")
MODES = BAD_IMAGE_MODES
# More unreadable images than this in a row is not a few bad files but a broken dataset (wrong
# folder, files still being copied): stop instead of skipping through it.
MAX_IN_A_ROW = 50


class UnreadableImageError(ValueError):
    """An image that cannot be decoded under data.on_bad_image=fail (or too many in a row)."""


class BadImages:
    """`read(index)` of a dataset, with the `data.on_bad_image` policy and a skip count shared by
    the processes that read it (loader workers inherit it with the dataset)."""

    def __init__(self, mode: str = "skip", option: str = "data.on_bad_image") -> None:
        if mode not in MODES:
            raise ValueError(f"{option}={mode!r} is not allowed; choose one of: {', '.join(MODES)}")
        self.mode, self.option = mode, option
        self._count = multiprocessing.get_context().Value("q", 0)

    @property
    def count(self) -> int:
        """Images skipped so far by this process and its loader workers."""
        return int(self._count.value)

    def read(self, index: int, size: int, load: Callable[[int], T], name: Callable[[int], str]) -> T:
        """`load(index)`, or under `skip` the first of index+1, index+2, ... (wrapping) that loads.
        `name(i)` says which file image i is, for the messages. Storage failures are not bad images:
        they propagate as they are."""
        for attempt in range(min(MAX_IN_A_ROW, size)):
            i = (index + attempt) % size
            try:
                return load(i)
            except StorageError:
                raise
            except Exception as err:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
                self._bad(name(i), err, f"the next image, {name((i + 1) % size)}, is used in its place")
        raise UnreadableImageError(
            f"{min(MAX_IN_A_ROW, size)} images in a row from {name(index)} cannot be decoded: the dataset "
            "looks broken (wrong data.root, or files still being copied?)"
        )

    def readable(self, name: str, decode: Callable[[], object]) -> bool:
        """True when `decode()` works; under `skip` a failure is warned, counted and False."""
        try:
            decode()
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - as in read()
            self._bad(name, err, "left out")
            return False
        return True

    def _bad(self, name: str, err: Exception, instead: str) -> None:
        from PIL import UnidentifiedImageError

        if isinstance(err, UnidentifiedImageError):  # its message names an in-memory buffer, not the file
            reason = "UnidentifiedImageError: not an image format PIL can read"
        else:
            reason = f"{type(err).__name__}: {err}"
        if self.mode == "fail":
            raise UnreadableImageError(
                f"cannot decode image {name} ({reason}); remove or replace the file, or set "
                f"{self.option}=skip to leave such images out"
            ) from None
        with self._count.get_lock():
            self._count.value += 1
        log.warning("unreadable image %s skipped (%s); %s (%s=skip)", name, reason, instead, self.option)


def of(dataset: object) -> BadImages | None:
    """The `BadImages` of a dataset, looking through Subset, MultiCropDataset and DecodedDataset;
    None for datasets without files (synthetic, fashion_mnist)."""
    while True:
        inner = getattr(dataset, "dataset", None)  # torch.utils.data.Subset
        inner = getattr(dataset, "base", None) if inner is None else inner
        if inner is None:
            return getattr(dataset, "bad_images", None)
        dataset = inner
