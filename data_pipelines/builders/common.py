"""What the TFDS builders of this package share: the bad-record policy and the image features.

Every builder here reads a public annotation dump, turns records into examples of one image
each, and skips or refuses bad records (:mod:`data_pipelines.skips`). The parts that must stay
the same across builders live here, so that a change reaches all of them:

* :class:`UnusableRecordError`, raised by a builder's record parser with the skip reason;
* :class:`SkipPolicyBuilder`, the base class taking ``skip_policy``, keeping
  ``skip_counts`` and refusing a split that skipping left empty;
* the image fields every example has (:meth:`SkipPolicyBuilder._dataset_info`,
  :func:`image_fields`), and :func:`read_image_of_size` for images whose size the annotations
  give;
* :func:`is_int` and :func:`is_finite_number`, the type checks of JSON fields.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.images import ImageError, encode_for_storage
from data_pipelines.skips import SkipCounter

# Key of ``skip_counts`` for records that no split can take (no usable split or image id).
UNASSIGNED = "unassigned"
# Skip reasons of read_image_of_size.
CORRUPT_IMAGE = "corrupt image"
SIZE_MISMATCH = "image size differs from annotations"


class UnusableRecordError(ValueError):
    """A record that cannot be used; ``reason`` is the builder's skip category for it.

    The parser that raises it does not know the file or the record's position; the builder
    catches it and reports ``reason`` with those to its :class:`~data_pipelines.skips.SkipCounter`.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def image_fields(*, encoded: bytes, image_id: str, filename: str, height: int,
                 width: int) -> dict[str, Any]:
    """The image entries of an example: ``encoded`` as
    :func:`data_pipelines.images.encode_for_storage` gives it, ``height x width`` pixels."""
    return {"image": encoded, "image/id": image_id, "image/filename": filename,
            "image/height": height, "image/width": width}


def read_image_of_size(path: str, *, size: tuple[int, int], size_file: str, record: str,
                       skips: SkipCounter) -> bytes | None:
    """The image file at ``path`` encoded for storage, if it is ``size`` ``(height, width)``.

    Boxes and masks are normalized by the size the annotations give; an image file of another
    size (a resized copy, an EXIF-rotated file) cannot be matched to them with certainty.

    Args:
      path: the image file (it exists).
      size: ``(height, width)`` that ``size_file`` gives for it.
      size_file: the annotation file giving ``size`` (for messages).
      record: which record the image is (``"image 391895"``), for messages.
      skips: where an unreadable image (:data:`CORRUPT_IMAGE`) or one of another size
        (:data:`SIZE_MISMATCH`) is reported.

    Returns:
      The encoded image, or ``None`` if it was reported.
    """
    try:
        encoded, height, width = encode_for_storage(path, name=path)
    except ImageError as error:
        skips.bad(CORRUPT_IMAGE, file=path, record=record, detail=str(error))
        return None
    if (height, width) != size:
        skips.bad(SIZE_MISMATCH, file=path, record=record,
                  detail=f"image is {width}x{height}, {size_file} says {size[1]}x{size[0]}")
        return None
    return encoded


class SkipPolicyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A ``GeneratorBasedBuilder`` whose bad records are skipped and counted, or refused.

    Subclasses make one counter per split with :meth:`_skip_counter` and hand it to
    :meth:`_keep_skip_counts` once the split is generated.

    Args:
      skip_policy: ``"skip"`` (count and leave out bad records) or ``"fail"`` (raise on the
        first, naming the file and record).
      **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``, ``config``, ...).

    Attributes:
      skip_counts: per generated split (or :data:`UNASSIGNED`), the skipped records per reason.
    """

    def __init__(self, *, skip_policy: str = "skip", **kwargs):
        # Validated now, not after the first bad record hours into a build.
        SkipCounter(policy=skip_policy)
        self.skip_policy = skip_policy
        self.skip_counts: dict[str, dict[str, int]] = {}
        super().__init__(**kwargs)

    def _dataset_info(self, *, features: Mapping[str, Any], homepage: str,
                      citation: str) -> tfds.core.DatasetInfo:
        """The ``DatasetInfo`` of examples holding the image fields and ``features``, described
        by the first paragraph of the builder module's docstring."""
        module_doc = sys.modules[type(self).__module__].__doc__
        return tfds.core.DatasetInfo(
            builder=self,
            description=module_doc.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image/id": tfds.features.Text(),
                "image/filename": tfds.features.Text(),
                "image/height": tfds.features.Scalar(np.int32),
                "image/width": tfds.features.Scalar(np.int32),
                **features,
            }),
            homepage=homepage,
            citation=citation,
        )

    def _skip_counter(self) -> SkipCounter:
        """A counter under this builder's policy, logging to the builder's module logger."""
        return SkipCounter(policy=self.skip_policy, logger_name=type(self).__module__)

    def _keep_skip_counts(self, key: str, skips: SkipCounter) -> None:
        """Keeps ``skips``' counts as ``skip_counts[key]`` and logs its summary."""
        self.skip_counts[key] = skips.counts()
        logging.getLogger(type(self).__module__).info(
            "%s/%s %s: %s", self.name, self.builder_config.name, key, skips.summary())

    def _refuse_empty_split(self, split: str, *, num_examples: int, skips: SkipCounter,
                            detail: str) -> None:
        """Raises ``ValueError`` (``detail`` says what was skipped) if the split has no example.

        TFDS refuses an empty split with a bare assertion; this says why it is empty.
        """
        if not num_examples:
            raise ValueError(f"{self.name}/{self.builder_config.name} split {split!r}: "
                             f"{detail}\n{skips.summary()}")


def is_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool`` (``True`` is no id)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite ``int`` or ``float`` (not a ``bool``, NaN or infinity)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))
