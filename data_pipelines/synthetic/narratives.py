"""A spoken narrative of a scene with the mouse trace of its speaker, as Localized Narratives has.

The narrator describes the shapes from left to right, one or two sentences each ("In this image
there is a small red circle on the left. It is partly hidden by the blue square."). The speech
is cut into utterances of one to four words, each with its time window; while the sentences of
a shape are spoken the mouse wanders over that shape's visible pixels, and in the pause after
them it travels to the next shape. The trace is sampled every 30 to 50 ms (each interval drawn
at random, as a real mouse's are uneven), with a little hand tremor; x and y are normalized by
the image's width and height, times are in seconds on the speech's clock.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.synthetic.language import Description, position_phrase
from data_pipelines.synthetic.scenes import Scene, SceneObject

WORD_SECONDS = (0.22, 0.42)
SAMPLE_SECONDS = (0.03, 0.05)
# Silence between two utterances of a shape, and the pause in which the mouse moves on.
UTTERANCE_GAP_SECONDS = (0.0, 0.12)
TRAVEL_SECONDS = (0.45, 0.9)
# How long the mouse takes from one point to the next while it wanders over a shape.
WANDER_SECONDS = (0.2, 0.35)
# The mouse settles on a shape this long before the first word about it and leaves this long
# after the last.
SETTLE_SECONDS = 0.12
TREMOR_PIXELS = 0.25
# A shape this much hidden is said to be.
HIDDEN_FRACTION = 0.95
# Where the straight way between two points is checked.
_STEPS = np.linspace(0, 1, 8)
_OPENINGS = ("There is", "I can see", "We can also see", "There is also")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Utterance:
    """A piece of the caption as spoken.

    Attributes:
      text: its words, as in the caption.
      start_time, end_time: seconds.
      object_index: the shape (index into ``Scene.objects``) it is about.
    """

    text: str
    start_time: float
    end_time: float
    object_index: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Narration:
    """A caption, its utterances (in order; their texts joined by spaces are the caption) and
    the trace ``[P, 3]`` of ``(x, y, t)`` rows, x and y normalized, t increasing."""

    caption: str
    utterances: tuple[Utterance, ...]
    trace: np.ndarray


def narrate(scene: Scene, rng: np.random.Generator) -> Narration:
    """The narrative of ``scene`` (module docstring)."""
    height, width = scene.image.shape[:2]
    order = sorted(range(len(scene.objects)), key=lambda i: scene.objects[i].centre[0])
    # Where the mouse is at which time, in pixels; the trace interpolates between them.
    keyframes = [(0.0, rng.uniform(0, width), rng.uniform(0, height))]
    utterances = []
    clock = float(rng.uniform(0.6, 1.2))
    for position, index in enumerate(order):
        obj = scene.objects[index]
        first_start = clock
        for words in _chunks(_sentences(scene, obj, first=position == 0, rng=rng).split(), rng):
            end = clock + float(rng.uniform(*WORD_SECONDS, size=len(words)).sum())
            utterances.append(Utterance(text=" ".join(words), start_time=round(clock, 3),
                                        end_time=round(end, 3), object_index=index))
            clock = end + float(rng.uniform(*UTTERANCE_GAP_SECONDS))
        keyframes += _wander(obj, rng, start=first_start - SETTLE_SECONDS,
                             end=utterances[-1].end_time + SETTLE_SECONDS)
        clock = utterances[-1].end_time + float(rng.uniform(*TRAVEL_SECONDS))
    times = np.cumsum(rng.uniform(*SAMPLE_SECONDS, size=_max_samples(keyframes[-1][0])))
    times = times[times <= keyframes[-1][0]]
    key_t, key_x, key_y = (np.array(column) for column in zip(*keyframes))
    x = np.interp(times, key_t, key_x) + rng.normal(0, TREMOR_PIXELS, size=times.shape)
    y = np.interp(times, key_t, key_y) + rng.normal(0, TREMOR_PIXELS, size=times.shape)
    trace = np.stack([np.round(np.clip(x, 0, width) / width, 4),
                      np.round(np.clip(y, 0, height) / height, 4),
                      np.round(times, 3)], axis=-1)
    return Narration(caption=" ".join(u.text for u in utterances),
                     utterances=tuple(utterances), trace=trace)


def _max_samples(duration: float) -> int:
    return int(np.ceil(duration / SAMPLE_SECONDS[0])) + 1


def _sentences(scene: Scene, obj: SceneObject, *, first: bool,
               rng: np.random.Generator) -> str:
    """What the narrator says about ``obj``."""
    height, width = scene.image.shape[:2]
    opening = ("In this image there is" if first
               else _OPENINGS[rng.integers(len(_OPENINGS))])
    said = (f"{opening} a {Description.of(obj, ('size', 'colour', 'shape')).text} "
            f"{position_phrase(obj, height=height, width=width)}.")
    if obj.visible_fraction < HIDDEN_FRACTION:
        in_front = [other for other in scene.objects if other.depth > obj.depth]
        occluder = max(in_front, key=lambda other: int((other.mask & obj.full_mask).sum()))
        said += (" It is partly hidden by the "
                 f"{Description.of(occluder, ('colour', 'shape')).text}.")
    return said


def _chunks(words: list[str], rng: np.random.Generator) -> list[list[str]]:
    """``words`` cut into consecutive pieces of 1 to 4 words."""
    chunks = []
    while words:
        size = int(rng.integers(1, 5))
        chunks.append(words[:size])
        words = words[size:]
    return chunks


def _wander(obj: SceneObject, rng: np.random.Generator, *, start: float, end: float
            ) -> list[tuple[float, float, float]]:
    """Keyframes ``(t, x, y)`` from ``start`` to ``end`` at points of the shape's visible
    pixels, away from its edge where it is thick enough, each next point one that the straight
    way to crosses only the shape's pixels (when one of a few candidates does)."""
    core = _eroded(obj.mask)
    rows, cols = np.nonzero(core if core.any() else obj.mask)
    keyframes = []
    t = start
    previous = None
    while True:
        point = _next_point(obj.mask, rows, cols, previous, rng)
        keyframes.append((t, *point))
        previous = point
        if t >= end:
            return keyframes
        t = min(t + float(rng.uniform(*WANDER_SECONDS)), end)


def _next_point(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                previous: tuple[float, float] | None, rng: np.random.Generator
                ) -> tuple[float, float]:
    candidates = rng.integers(len(rows), size=8)
    points = np.stack([cols[candidates] + 0.5, rows[candidates] + 0.5], axis=-1)
    if previous is None:
        return tuple(points[0])
    # [candidate, step, (x, y)] points along each straight way.
    along = np.asarray(previous) + _STEPS[None, :, None] * (points[:, None, :] - previous)
    inside = mask[along[..., 1].astype(int), along[..., 0].astype(int)].all(axis=1)
    return tuple(points[np.argmax(inside)])


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` whose 4 neighbours are in it too."""
    padded = np.pad(mask, 1)
    return (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
            & padded[1:-1, 2:])
