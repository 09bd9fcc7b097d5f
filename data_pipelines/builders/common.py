"""What the TFDS builders of this package share: the bad-record policy and the image features.

Every builder here reads a public annotation dump, turns records into examples of one image
each, and skips or refuses bad records (:mod:`data_pipelines.skips`). The parts that must stay
the same across builders live here, so that a change reaches all of them:

* :class:`UnusableRecordError`, raised by a builder's record parser with the skip reason;
* :class:`SkipPolicyBuilder`, the base class taking ``skip_policy`` and ``splits``, keeping
  ``skip_counts``, printing each split's skip summary, and leaving out (``"skip"``) or refusing
  (``"fail"``) a split that has no example, so one empty split never loses the others;
* the image fields every example has (:meth:`SkipPolicyBuilder._dataset_info`,
  :func:`image_fields`), and :func:`read_image_of_size` for images whose size the annotations
  give;
* :func:`is_int` and :func:`is_finite_number`, the type checks of JSON fields.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
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

    Boxes and masks are normalized by the size the annotations give, in the stored pixel frame
    (no EXIF rotation, see :mod:`data_pipelines.images`); an image file of another size (a
    resized copy) cannot be matched to them with certainty.

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


class EmptySplitError(ValueError):
    """A split without a single example; ``split`` names it, the message says why."""

    def __init__(self, split: str, message: str):
        super().__init__(message)
        self.split = split


class SkipPolicyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A ``GeneratorBasedBuilder`` whose bad records are skipped and counted, or refused.

    Subclasses implement :meth:`_example_generators` (what ``_split_generators`` is to TFDS),
    make one counter per split with :meth:`_skip_counter`, hand it to :meth:`_keep_skip_counts`
    once the split is generated and say why a split came out empty with
    :meth:`_refuse_empty_split`. Builders whose splits come from separate files pick them with
    :meth:`_choose_splits`.

    A split without examples (every record skipped, or none listed) cannot be written (TFDS
    refuses it). Under ``"skip"`` it is left out, announced on stderr and kept in
    :attr:`empty_splits`, and the other splits are written; under ``"fail"`` the build stops
    with :class:`EmptySplitError` naming it. Only a build left with no split at all fails
    under both.

    Args:
      skip_policy: ``"skip"`` (count and leave out bad records) or ``"fail"`` (raise on the
        first, naming the file and record).
      splits: the splits to build; ``None`` builds every split whose files are present
        (announcing the missing ones). A split named here whose files are missing is an error.
      **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``, ``config``, ...).

    Attributes:
      skip_counts: per generated split (or :data:`UNASSIGNED`), the skipped records per reason.
      requested_splits: ``splits``, as a tuple (or ``None``).
      empty_splits: per split left out for having no example, why.
    """

    def __init__(self, *, skip_policy: str = "skip", splits: Sequence[str] | None = None,
                 **kwargs):
        # Validated now, not after the first bad record hours into a build.
        SkipCounter(policy=skip_policy)
        if isinstance(splits, str):
            raise TypeError(f"splits must be a sequence of split names, got the string "
                            f"{splits!r}")
        self.skip_policy = skip_policy
        self.requested_splits = None if splits is None else tuple(splits)
        self.skip_counts: dict[str, dict[str, int]] = {}
        self.empty_splits: dict[str, str] = {}
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

    def _example_generators(self, dl_manager: tfds.download.DownloadManager
                            ) -> Mapping[str, Iterator[tuple[str, dict]]]:
        """Split name -> a generator of ``(key, example)``, as TFDS's ``_split_generators``."""
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager
                          ) -> dict[str, Iterator[tuple[str, dict]]]:
        """:meth:`_example_generators` restricted to ``splits`` and to splits with examples.

        Each split's generator is run up to its first example before TFDS writes anything: a
        split with none must be known before TFDS's writer fails on it and loses the others.
        """
        generators = self._example_generators(dl_manager)
        if self.requested_splits is not None:
            unknown = sorted(set(self.requested_splits) - set(generators))
            if unknown:
                raise ValueError(f"{self._full_name}: no split {unknown} among the ones "
                                 f"built: {sorted(generators)}")
        kept = {}
        for split, examples in generators.items():
            if self.requested_splits is not None and split not in self.requested_splits:
                continue
            try:
                first = next(examples)
            except StopIteration:
                error = EmptySplitError(split, f"{self._full_name} split {split!r}: no examples")
            except EmptySplitError as refused:
                error = refused
            else:
                kept[split] = itertools.chain([first], examples)
                continue
            if self.skip_policy == "fail":
                raise error
            self.empty_splits[split] = str(error)
            _announce(f"{error}\n=> split {split!r} is NOT written; the others are.")
        if not kept:
            raise ValueError("no split has any example:\n"
                             + "\n".join(self.empty_splits.values()))
        return kept

    def _choose_splits(self, present: Sequence[str], missing: Mapping[str, str]) -> list[str]:
        """The splits to read: those of ``present`` named in ``splits``, or all of them.

        Args:
          present: the splits whose files are all there.
          missing: split -> what is missing for it (a file or pattern), announced on stderr.

        Raises:
          FileNotFoundError: a split asked for in ``splits`` misses its files, or no split has
            them.
        """
        if self.requested_splits is not None:
            absent = {split: what for split, what in missing.items()
                      if split in self.requested_splits}
            if absent:
                raise FileNotFoundError(f"{self._full_name}: files of the requested split(s) "
                                        f"are missing: {absent}")
            # A name no split has is reported by _split_generators, with the known ones.
            return [split for split in present if split in self.requested_splits]
        if not present:
            raise FileNotFoundError(f"{self._full_name}: no split has its files: {dict(missing)}"
                                    f"\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        for split, what in missing.items():
            _announce(f"{self._full_name}: split {split!r} is NOT built: {what} is missing "
                      f"(building {list(present)}; pass splits=[...] to choose)")
        return list(present)

    def _skip_counter(self) -> SkipCounter:
        """A counter under this builder's policy, logging to the builder's module logger."""
        return SkipCounter(policy=self.skip_policy, logger_name=type(self).__module__)

    def _keep_skip_counts(self, key: str, skips: SkipCounter) -> None:
        """Keeps ``skips``' counts as ``skip_counts[key]`` and prints its summary (to stdout:
        logging hides INFO by default, and a build's losses must be seen)."""
        self.skip_counts[key] = skips.counts()
        print(f"{self._full_name} {key}: {skips.summary()}", flush=True)

    def _refuse_empty_split(self, split: str, *, num_examples: int, skips: SkipCounter,
                            detail: str) -> None:
        """Raises :class:`EmptySplitError` (``detail`` says what was skipped) if the split has
        no example; :meth:`_split_generators` leaves the split out or stops the build."""
        if not num_examples:
            raise EmptySplitError(split, f"{self._full_name} split {split!r}: {detail}\n"
                                  f"{skips.summary()}")

    @property
    def _full_name(self) -> str:
        return f"{self.name}/{self.builder_config.name}"


def _announce(message: str) -> None:
    """Prints a warning that a build lost a whole split, where no logging setup can hide it."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def is_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool`` (``True`` is no id)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite ``int`` or ``float`` (not a ``bool``, NaN or infinity)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def load_json(path: str) -> Any:
    """The JSON file at ``path``; a malformed file raises ``ValueError`` naming it."""
    with open(path, "rb") as f:
        try:
            return json.load(f)
        except ValueError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from error


def json_list(content: Any, path: str, *, key: str | None = None) -> list:
    """``content[key]`` (``content`` itself for ``key`` None), which must be a list; else a
    ``ValueError`` naming ``path`` and the field."""
    value = content if key is None else (content.get(key) if isinstance(content, dict) else None)
    if not isinstance(value, list):
        where = f"field {key!r}" if key else "the top level"
        raise ValueError(f"{path}: expected a list at {where}")
    return value
