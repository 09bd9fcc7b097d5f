"""Localized Narratives (Pont-Tuset et al., ECCV 2020) as a TFDS builder: captions, mouse traces.

Annotators described an image aloud while moving the mouse over what they talked about. The
public jsonl files hold one narrative per line: ``dataset_id``, ``image_id`` (a string),
``annotator_id``, ``caption``, ``timed_caption`` (consecutive pieces of the caption, each
``{utterance, start_time, end_time}``), ``traces`` (segments of ``{x, y, t}`` points, x and y
normalized from the top-left corner, possibly slightly outside [0, 1], t in seconds) and
``voice_recording``.

Example layout (one example per image; several annotators may describe one image)::

    image            uint8 [H, W, 3]         upright RGB (see data_pipelines.images)
    image/id         text                    the data set's image id ("391895")
    image/filename   text                    file name inside the split's image folder
    image/height, image/width   int32
    narratives       sequence [N] of {caption: text, annotator_id: int32}
    utterances       sequence [U] of {narrative: int32 (index into narratives),
                                      text, start_time: f64, end_time: f64,
                                      box: f32 [4], points: f32 [16, 2], valid: bool}
    trace            sequence [P] of {narrative: int32, xy: f32 [2], t: f64}

The utterances and trace points of all narratives are stored flat, each narrative's contiguous
and in order, with ``narrative`` pointing at its narrative: TFDS cannot store a sequence nested
in a sequence without TensorFlow. ``trace`` holds every point of the narrative's trace segments,
merged and sorted by time (stably: points of equal time keep their file order), as in the file
(not clipped, not averaged); times and windows stay float64, the precision of the file's
decimals, so that the exact alignment (:mod:`data_pipelines.alignment`) decides which points
lie in a window exactly as the file's numbers say (in float32, a point on a window's boundary
can move into or out of it).

Per utterance (as the official PixelLLM ``build_ln_tfrecord.py``, except where noted): all trace
segments of the narrative are merged and sorted by time; x and y are linearly interpolated at
:data:`NUM_SAMPLES` equally spaced times in ``[start_time, end_time]`` (``points``, (x, y)); the
``box`` is the min/max of those samples. Deviations, each for a reason:

* times outside the trace's time range take the trace's first/last point (clamping) instead of
  extrapolating the first/last segment, which can throw points far outside the image;
* points and boxes are clipped to [0, 1] (the official code clips only later, when aligning);
* points recorded at the same time are averaged, so interpolation is well defined;
* ``valid`` is False for an utterance that is empty after stripping, whose window ends before
  it starts, or whose window ``[start_time, end_time]`` does not overlap the
  trace's time range (its samples would all be one clamped end point, not a location).

A record is skipped (not stored) when its utterances are not its caption's words: the
caption and the utterances joined must hold the same letters and digits, in order, after
case-folding (punctuation, spacing and how words are split over utterances may differ), since
the word-to-trace alignment gives each caption word the trace of the utterance saying it.

Bad records go through :class:`~data_pipelines.skips.SkipCounter` (``skip_policy``; reasons in
:data:`SKIP_REASONS`); the summary is printed at the end of each split and kept in
:attr:`LocalizedNarratives.skip_counts`.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.builders.common import SkipPolicyBuilder, UnusableRecordError, image_fields
from data_pipelines.images import ImageError, encode_for_storage
from data_pipelines.skips import SkipCounter

NUM_SAMPLES = 16

# Reasons a record is skipped (the SkipCounter categories).
MALFORMED_JSON = "malformed json line"
BAD_FIELD = "missing or invalid field"
EMPTY_CAPTION = "empty caption"
NO_UTTERANCES = "no utterances"
TOO_FEW_POINTS = "trace with <= 1 point"
TRACE_OUTSIDE = "trace entirely outside the image"
BAD_IMAGE = "missing or corrupt image"
NO_NARRATIVE = "image without usable narrative"
UNRELATED_UTTERANCES = "utterances differ from the caption"
ID_OUT_OF_RANGE = "annotator id outside int32"
SKIP_REASONS = (MALFORMED_JSON, BAD_FIELD, EMPTY_CAPTION, NO_UTTERANCES, TOO_FEW_POINTS,
                TRACE_OUTSIDE, BAD_IMAGE, NO_NARRATIVE, UNRELATED_UTTERANCES, ID_OUT_OF_RANGE)

# The annotator id is stored as int32 (the feature spec); TFDS's encoder raises on anything else.
_INT32 = np.iinfo(np.int32)


class BadNarrativeError(UnusableRecordError):
    """A narrative record that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""


@dataclasses.dataclass(frozen=True)
class Narrative:
    """One annotator's narrative, with its utterances' trace samples.

    Attributes:
      image_id: the data set's image id.
      annotator_id: the annotator.
      caption: the whole caption.
      texts: ``[U]`` utterance texts, as in the file.
      start_times, end_times: ``[U]`` float64 utterance windows, seconds, as in the file.
      points: ``[U, NUM_SAMPLES, 2]`` (x, y) trace samples in the window, normalized, clipped.
      boxes: ``[U, 4]`` (x0, y0, x1, y1) min/max of ``points``.
      valid: ``[U]`` whether the utterance has text and a trace location (module docstring).
      trace_xy: ``[P, 2]`` float32 (x, y) of every trace point, sorted by time, as in the file.
      trace_t: ``[P]`` float64 times of ``trace_xy``, non-decreasing.
    """

    image_id: str
    annotator_id: int
    caption: str
    texts: tuple[str, ...]
    start_times: np.ndarray
    end_times: np.ndarray
    points: np.ndarray
    boxes: np.ndarray
    valid: np.ndarray
    trace_xy: np.ndarray
    trace_t: np.ndarray


def sample_utterance_traces(*, trace: np.ndarray, start_times: np.ndarray,
                            end_times: np.ndarray, num_samples: int = NUM_SAMPLES
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples the trace in every utterance window (see the module docstring).

    Args:
      trace: ``[P, 3]`` points ``(x, y, t)``, all segments merged, any order, ``P >= 1``.
      start_times, end_times: ``[U]`` utterance windows.
      num_samples: samples per window.

    Returns:
      ``(points [U, num_samples, 2], boxes [U, 4], overlaps [U])``, float32 points and boxes
      clipped to [0, 1]; ``overlaps`` says whether the window meets the trace's time range.
    """
    times, inverse = np.unique(trace[:, 2], return_inverse=True)
    counts = np.bincount(inverse)
    # Points recorded at the same instant are averaged: np.interp needs increasing times.
    xs = np.bincount(inverse, weights=trace[:, 0]) / counts
    ys = np.bincount(inverse, weights=trace[:, 1]) / counts
    # [U, S]; np.interp takes the end values outside [times[0], times[-1]] (clamping).
    sample_times = np.linspace(start_times, end_times, num_samples, axis=-1)
    points = np.stack([np.interp(sample_times, times, xs), np.interp(sample_times, times, ys)],
                      axis=-1)
    points = np.clip(points, 0.0, 1.0).astype(np.float32).reshape(-1, num_samples, 2)
    boxes = np.concatenate([points.min(axis=1), points.max(axis=1)], axis=-1)
    overlaps = (start_times <= times[-1]) & (end_times >= times[0])
    return points, boxes, overlaps


def parse_narrative(record: Any) -> Narrative:
    """A decoded jsonl record -> :class:`Narrative`.

    Raises:
      BadNarrativeError: a field is missing or of the wrong type, the annotator id is outside
        int32, the caption or utterance list is empty, the utterances are not the caption's
        words (module docstring), the trace has at most one point or lies entirely outside the
        image.
    """
    if not isinstance(record, Mapping):
        raise BadNarrativeError(BAD_FIELD, f"expected a JSON object, got {type(record).__name__}")
    image_id = _image_id(record)
    annotator_id = _field(record, "annotator_id", int)
    if not _INT32.min <= annotator_id <= _INT32.max:
        raise BadNarrativeError(ID_OUT_OF_RANGE, f"image {image_id}: annotator_id "
                                f"{annotator_id} does not fit the stored int32")
    caption = _field(record, "caption", str)
    if not caption.strip():
        raise BadNarrativeError(EMPTY_CAPTION, f"image {image_id}: caption is empty")
    timed_caption = _field(record, "timed_caption", list)
    if not timed_caption:
        raise BadNarrativeError(NO_UTTERANCES, f"image {image_id}: timed_caption is empty")
    texts, start_times, end_times = [], [], []
    for index, utterance in enumerate(timed_caption):
        where = f"timed_caption[{index}]"
        if not isinstance(utterance, Mapping):
            raise BadNarrativeError(BAD_FIELD, f"{where} is not an object")
        texts.append(_field(utterance, "utterance", str, where=where))
        start_times.append(_number(utterance, "start_time", where=where))
        end_times.append(_number(utterance, "end_time", where=where))
    if _letters(caption) != _letters(" ".join(texts)):
        raise BadNarrativeError(UNRELATED_UTTERANCES, f"image {image_id}: the utterances "
                                f"{_preview(' '.join(texts))!r} do not say the caption "
                                f"{_preview(caption)!r}")
    trace = _trace(_field(record, "traces", list))
    if len(trace) <= 1:
        raise BadNarrativeError(TOO_FEW_POINTS, f"image {image_id}: the traces hold "
                                f"{len(trace)} point(s)")
    inside = ((trace[:, :2] >= 0.0) & (trace[:, :2] <= 1.0)).all(axis=1)
    if not inside.any():
        raise BadNarrativeError(TRACE_OUTSIDE, f"image {image_id}: all {len(trace)} trace "
                                "points lie outside the image")
    start = np.asarray(start_times, np.float64)
    end = np.asarray(end_times, np.float64)
    points, boxes, overlaps = sample_utterance_traces(trace=trace, start_times=start,
                                                      end_times=end)
    has_text = np.array([bool(text.strip()) for text in texts])
    order = np.argsort(trace[:, 2], kind="stable")
    return Narrative(image_id=image_id, annotator_id=annotator_id, caption=caption,
                     texts=tuple(texts), start_times=start, end_times=end, points=points,
                     boxes=boxes, valid=has_text & (start <= end) & overlaps,
                     trace_xy=trace[order, :2].astype(np.float32), trace_t=trace[order, 2])


def _float64() -> tfds.features.Tensor:
    """A float64 scalar feature stored as its 8 bytes: TFDS's default encoding keeps floats in
    float32, which would move trace points across window boundaries."""
    return tfds.features.Tensor(shape=(), dtype=np.float64,
                                encoding=tfds.features.Encoding.BYTES)


def _letters(text: str) -> str:
    """What must agree between a caption and its utterances: letters and digits, case-folded."""
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def _preview(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _field(record: Mapping, key: str, kind: type, *, where: str = "record") -> Any:
    if key not in record:
        raise BadNarrativeError(BAD_FIELD, f"{where} has no field {key!r}")
    value = record[key]
    # bool is an int subclass; True is no annotator id.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadNarrativeError(BAD_FIELD, f"{where} field {key!r} is {type(value).__name__}, "
                                f"expected {kind.__name__}")
    return value


def _number(record: Mapping, key: str, *, where: str) -> float:
    if key not in record:
        raise BadNarrativeError(BAD_FIELD, f"{where} has no field {key!r}")
    value = record[key]
    # Python's json also reads NaN and Infinity, which no time or coordinate can be.
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value)):
        raise BadNarrativeError(BAD_FIELD, f"{where} field {key!r} is {value!r}, expected a "
                                "finite number")
    return float(value)


def _image_id(record: Mapping) -> str:
    if "image_id" not in record:
        raise BadNarrativeError(BAD_FIELD, "record has no field 'image_id'")
    image_id = record["image_id"]
    # The files spell ids as strings; a bare integer id is the same id.
    if isinstance(image_id, bool) or not isinstance(image_id, str | int) or image_id == "":
        raise BadNarrativeError(BAD_FIELD, f"field 'image_id' is {image_id!r}, expected a "
                                "non-empty string")
    return str(image_id)


def _trace(segments: list) -> np.ndarray:
    """``[P, 3]`` (x, y, t) of all segments, merged."""
    # Fast path for well-formed traces (thousands of points per narrative); anything odd goes
    # through the point-by-point check, which names the bad point.
    try:
        rows = [(point["x"], point["y"], point["t"]) for segment in segments
                for point in segment]
    except (KeyError, TypeError):
        return _checked_trace(segments)
    if {type(value) for row in rows for value in row} <= {int, float}:
        trace = np.asarray(rows, np.float64).reshape(-1, 3)
        if np.isfinite(trace).all():
            return trace
    return _checked_trace(segments)


def _checked_trace(segments: list) -> np.ndarray:
    rows = []
    for s, segment in enumerate(segments):
        if not isinstance(segment, list):
            raise BadNarrativeError(BAD_FIELD, f"traces[{s}] is not a list")
        for p, point in enumerate(segment):
            where = f"traces[{s}][{p}]"
            if not isinstance(point, Mapping):
                raise BadNarrativeError(BAD_FIELD, f"{where} is not an object")
            rows.append([_number(point, key, where=where) for key in ("x", "y", "t")])
    return np.asarray(rows, np.float64).reshape(-1, 3)


@dataclasses.dataclass(frozen=True)
class SplitSource:
    """Where one split's files are, relative to the manual download folder.

    Attributes:
      annotations: glob patterns of the jsonl files (all matches are read, sorted).
      image_dir: folder of the images.
      image_filename: file name of an image, ``str.format``-ed with ``image_id``.
    """

    annotations: tuple[str, ...]
    image_dir: str
    image_filename: str


@dataclasses.dataclass(eq=False)
class LocalizedNarrativesConfig(tfds.core.BuilderConfig):
    """A config per image source: which files make which split."""

    splits: Mapping[str, SplitSource] = dataclasses.field(default_factory=dict)


_COCO_FILENAME = "{image_id:0>12}.jpg"  # COCO 2017: 12-digit zero-padded ids.

COCO = LocalizedNarrativesConfig(
    name="coco",
    description="COCO 2017 images (train2017/, val2017/) with their Localized Narratives.",
    splits={
        "train": SplitSource(annotations=("coco_train_localized_narratives-*.jsonl",),
                             image_dir="train2017", image_filename=_COCO_FILENAME),
        "validation": SplitSource(annotations=("coco_val_localized_narratives.jsonl",),
                                  image_dir="val2017", image_filename=_COCO_FILENAME),
    },
)


class LocalizedNarratives(SkipPolicyBuilder):
    """Localized Narratives, one example per image (see the module docstring).

    Takes :class:`~data_pipelines.builders.common.SkipPolicyBuilder`'s ``skip_policy`` (under
    ``"fail"`` the error names the file and line) and keeps its ``skip_counts`` per split.

    Its ``splits`` argument (of ``SkipPolicyBuilder``) picks splits by name (``"train"``,
    ``"validation"``); by default every split whose annotation files are present is built and
    the others are named on stderr, so the validation split can be built without the gigabytes
    of train shards. TFDS keeps a built data set as it is: to add a split later, build again
    into an empty ``data_dir``.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Raw time-sorted trace points and float64 utterance windows (exact "
                 "alignment); records whose utterances are not the caption's words, or whose "
                 "annotator id is outside int32, are skipped.",
    }
    BUILDER_CONFIGS = [COCO]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download from https://google.github.io/localized-narratives/ the jsonl files of the image
    source and put them, with the images, in the manual folder (`manual_dir`). For `coco`:

      manual_dir/
        coco_train_localized_narratives-00000-of-00004.jsonl  ... -00003-of-00004.jsonl
        coco_val_localized_narratives.jsonl
        train2017/000000000009.jpg ...     (COCO 2017 train images)
        val2017/000000000139.jpg ...       (COCO 2017 val images)

    Symbolic links to existing COCO folders work. Only the splits whose files are present are
    built (e.g. `coco_val_localized_narratives.jsonl` and `val2017/` alone give `validation`).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self._dataset_info(
            features={
                "narratives": tfds.features.Sequence({
                    "caption": tfds.features.Text(),
                    "annotator_id": tfds.features.Scalar(np.int32),
                }),
                "utterances": tfds.features.Sequence({
                    "narrative": tfds.features.Scalar(np.int32),
                    "text": tfds.features.Text(),
                    "start_time": _float64(),
                    "end_time": _float64(),
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "points": tfds.features.Tensor(shape=(NUM_SAMPLES, 2), dtype=np.float32),
                    "valid": tfds.features.Scalar(np.bool_),
                }),
                "trace": tfds.features.Sequence({
                    "narrative": tfds.features.Scalar(np.int32),
                    "xy": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                    "t": _float64(),
                }),
            },
            homepage="https://google.github.io/localized-narratives/",
            citation=_CITATION,
        )

    def _example_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        files_by_split, missing = {}, {}
        for split, source in self.builder_config.splits.items():
            files = sorted({path for pattern in source.annotations
                            for path in glob.glob(os.path.join(manual_dir, pattern))})
            if files:
                files_by_split[split] = files
            else:
                missing[split] = f"a file matching {list(source.annotations)} in {manual_dir}"
        generators = {}
        for split in self._choose_splits(list(files_by_split), missing):
            source = self.builder_config.splits[split]
            generators[split] = self._generate_examples(
                split=split, files=files_by_split[split],
                image_dir=os.path.join(manual_dir, source.image_dir),
                image_filename=source.image_filename)
        return generators

    def _generate_examples(self, *, split: str, files: Sequence[str], image_dir: str,
                           image_filename: str) -> Iterator[tuple[str, dict]]:
        skips = self._skip_counter()
        # Two passes keep memory to line offsets: the COCO train files hold gigabytes of
        # traces, and an image's narratives may be spread over several files.
        lines_by_image = _index_lines(files, skips)
        handles = [open(path, "rb") for path in files]
        num_examples = 0
        try:
            for image_id in sorted(lines_by_image):
                example = self._example(image_id, lines_by_image[image_id], files=files,
                                        handles=handles, image_dir=image_dir,
                                        image_filename=image_filename, skips=skips)
                if example is not None:
                    num_examples += 1
                    yield image_id, example
        finally:
            for handle in handles:
                handle.close()
        self._keep_skip_counts(split, skips)
        self._refuse_empty_split(
            split, num_examples=num_examples, skips=skips,
            detail=f"all {len(lines_by_image)} image(s) of {len(files)} annotation file(s) were "
            f"skipped (images in {image_dir}?)")

    def _example(self, image_id: str, lines: list[tuple[int, int, int]], *,
                 files: Sequence[str], handles: Sequence[Any], image_dir: str,
                 image_filename: str, skips: SkipCounter) -> dict | None:
        narratives = []
        for file_index, offset, line_number in lines:
            handles[file_index].seek(offset)
            # The first pass decoded this line, so it decodes again.
            record = json.loads(handles[file_index].readline())
            try:
                narratives.append(parse_narrative(record))
            except BadNarrativeError as error:
                skips.bad(error.reason, file=files[file_index], record=f"line {line_number}",
                          detail=str(error))
        if not narratives:
            skips.bad(NO_NARRATIVE, file=files[lines[0][0]], record=f"image {image_id}",
                      detail=f"none of its {len(lines)} narrative(s) is usable")
            return None
        filename = image_filename.format(image_id=image_id)
        path = os.path.join(image_dir, filename)
        try:
            encoded, height, width = encode_for_storage(
                path, name=os.path.join(os.path.basename(image_dir), filename))
        except ImageError as error:
            skips.bad(BAD_IMAGE, file=path, record=f"image {image_id}", detail=str(error))
            return None
        return {
            **image_fields(encoded=encoded, image_id=image_id, filename=filename,
                           height=height, width=width),
            "narratives": [{"caption": n.caption, "annotator_id": n.annotator_id}
                           for n in narratives],
            "utterances": [
                {"narrative": index, "text": n.texts[u], "start_time": n.start_times[u],
                 "end_time": n.end_times[u], "box": n.boxes[u], "points": n.points[u],
                 "valid": bool(n.valid[u])}
                for index, n in enumerate(narratives) for u in range(len(n.texts))],
            # Column form: a narrative holds thousands of trace points.
            "trace": {
                "narrative": np.repeat(np.arange(len(narratives), dtype=np.int32),
                                       [len(n.trace_t) for n in narratives]),
                "xy": np.concatenate([n.trace_xy for n in narratives]),
                "t": np.concatenate([n.trace_t for n in narratives]),
            },
        }


def _index_lines(files: Sequence[str], skips: SkipCounter
                 ) -> dict[str, list[tuple[int, int, int]]]:
    """``image_id -> [(file index, byte offset, line number)]`` of the decodable lines."""
    lines_by_image = collections.defaultdict(list)
    for file_index, path in enumerate(files):
        with open(path, "rb") as f:
            offset = 0
            for line_number, line in enumerate(f, start=1):
                line_offset, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as error:  # also UnicodeDecodeError
                    skips.bad(MALFORMED_JSON, file=path, record=f"line {line_number}",
                              detail=f"not valid JSON: {error}")
                    continue
                try:
                    if not isinstance(record, Mapping):
                        raise BadNarrativeError(BAD_FIELD, "expected a JSON object, got "
                                                f"{type(record).__name__}")
                    image_id = _image_id(record)
                except BadNarrativeError as error:
                    skips.bad(error.reason, file=path, record=f"line {line_number}",
                              detail=str(error))
                    continue
                lines_by_image[image_id].append((file_index, line_offset, line_number))
    return lines_by_image


_CITATION = """\
@inproceedings{PontTuset_eccv2020,
  author    = {Jordi Pont-Tuset and Jasper Uijlings and Soravit Changpinyo and Radu Soricut
               and Vittorio Ferrari},
  title     = {Connecting Vision and Language with Localized Narratives},
  booktitle = {ECCV},
  year      = {2020}
}
"""
