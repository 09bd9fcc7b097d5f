"""Words for the shapes of a scene: descriptions, positions, relations, referring expressions.

A **description** names some of a shape's attributes ("red circle", "small square", "red
shape"); it matches every shape having them. A referring expression is built only when it
picks out exactly one shape of the scene (:func:`referring_expressions`):

* attributes: the fewest attributes that match the target alone ("the small red circle");
* relation: a description the target shares with others, narrowed by a relation to a landmark
  that itself has a unique description ("the red circle left of the blue square", "the square
  behind the green triangle"); only the target among the shapes matching its description
  stands in that relation to the landmark;
* superlative: the most extreme of the shapes matching a description by size or position
  ("the biggest triangle", "the leftmost red shape"), by a clear margin over the runner-up.

Relations: ``left of`` / ``right of`` / ``above`` / ``below`` (the target's centre lies beyond the
landmark's box edge and its box edge beyond the landmark's centre), ``behind`` / ``in front of``
(their whole shapes overlap and one is drawn before the other).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from data_pipelines.synthetic.scenes import SceneObject

# Attribute subsets a description may name, fewest first (the order minimal descriptions are
# searched in); each names the shape, as people do ("the red circle", not "the red one").
DESCRIPTION_FIELDS = (("shape",), ("colour", "shape"), ("size", "shape"),
                      ("size", "colour", "shape"))
# A superlative needs the winner ahead of the runner-up by this factor of radius ...
SIZE_MARGIN = 1.25
# ... or by this fraction of the image's side.
POSITION_MARGIN = 0.1
# Overlapping pixels of two whole shapes for one to be "behind" the other.
MIN_OVERLAP_PIXELS = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class Description:
    """Some attributes of a shape; ``None`` where unnamed."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    @classmethod
    def of(cls, obj: SceneObject, fields: Sequence[str]) -> Description:
        return cls(**{field: getattr(obj, field) for field in fields})

    @property
    def text(self) -> str:
        """"small red circle"; "red shape" when no shape is named."""
        return " ".join(word for word in (self.size, self.colour, self.shape or "shape")
                        if word)

    def matches(self, obj: SceneObject) -> bool:
        return ((self.size is None or obj.size == self.size)
                and (self.colour is None or obj.colour == self.colour)
                and (self.shape is None or obj.shape == self.shape))


def _centre(obj: SceneObject) -> tuple[float, float]:
    x0, y0, x1, y1 = obj.box
    return (x0 + x1) / 2, (y0 + y1) / 2


def _left_of(a: SceneObject, b: SceneObject) -> bool:
    return _centre(a)[0] < b.box[0] and a.box[2] < _centre(b)[0]


def _above(a: SceneObject, b: SceneObject) -> bool:
    return _centre(a)[1] < b.box[1] and a.box[3] < _centre(b)[1]


def _behind(a: SceneObject, b: SceneObject) -> bool:
    return a.depth < b.depth and int((a.full_mask & b.full_mask).sum()) >= MIN_OVERLAP_PIXELS


RELATIONS: dict[str, Callable[[SceneObject, SceneObject], bool]] = {
    "left of": _left_of,
    "right of": lambda a, b: _left_of(b, a),
    "above": _above,
    "below": lambda a, b: _above(b, a),
    "behind": _behind,
    "in front of": lambda a, b: _behind(b, a),
}


def unique_description(target: SceneObject, objects: Sequence[SceneObject]
                       ) -> Description | None:
    """The description with the fewest attributes that matches ``target`` alone, if any."""
    for fields in DESCRIPTION_FIELDS:
        description = Description.of(target, fields)
        if [obj for obj in objects if description.matches(obj)] == [target]:
            return description
    return None


def position_phrase(obj: SceneObject, *, height: int, width: int) -> str:
    """Where the shape is in the image: "on the left", "at the top right", "in the middle"."""
    x, y = _centre(obj)
    column = ("left", "", "right")[min(int(3 * x / width), 2)]
    row = ("top", "", "bottom")[min(int(3 * y / height), 2)]
    if row:
        return f"at the {row} {column}".rstrip()
    return f"on the {column}" if column else "in the middle"


def referring_expressions(target: SceneObject, objects: Sequence[SceneObject], *,
                          rng: np.random.Generator, height: int, width: int) -> list[str]:
    """Up to three expressions that pick out ``target`` alone (module docstring): one by
    attributes, one by relation, one superlative, each where one exists (one candidate drawn
    at random per kind)."""
    expressions = []
    attributes = unique_description(target, objects)
    if attributes is not None:
        expressions.append(f"the {attributes.text}")
    for candidates in (_relational(target, objects),
                       _superlatives(target, objects, height=height, width=width)):
        if candidates:
            expressions.append(candidates[rng.integers(len(candidates))])
    return expressions


def _relational(target: SceneObject, objects: Sequence[SceneObject]) -> list[str]:
    """Relational expressions of ``target`` whose description matches other shapes too (the
    relation is needed), else those naming only its shape."""
    needed, redundant = [], []
    landmarks = [(landmark, unique_description(landmark, objects)) for landmark in objects
                 if landmark is not target]
    landmarks = [(landmark, named) for landmark, named in landmarks if named is not None]
    for fields in DESCRIPTION_FIELDS:
        description = Description.of(target, fields)
        matching = [obj for obj in objects if description.matches(obj)]
        for landmark, landmark_description in landmarks:
            for name, relation in RELATIONS.items():
                if [obj for obj in matching if relation(obj, landmark)] == [target]:
                    text = f"the {description.text} {name} the {landmark_description.text}"
                    if len(matching) > 1:
                        needed.append(text)
                    elif fields == ("shape",):
                        redundant.append(text)
    return needed or redundant


def _superlatives(target: SceneObject, objects: Sequence[SceneObject], *, height: int,
                  width: int) -> list[str]:
    """Superlative expressions of ``target`` among at least two shapes matching a
    description."""
    measures = {
        "biggest": (lambda obj: obj.radius, lambda best, second: best >= SIZE_MARGIN * second),
        "smallest": (lambda obj: -obj.radius,
                     lambda best, second: -second >= SIZE_MARGIN * -best),
        "leftmost": (lambda obj: -_centre(obj)[0],
                     lambda best, second: best - second >= POSITION_MARGIN * width),
        "rightmost": (lambda obj: _centre(obj)[0],
                      lambda best, second: best - second >= POSITION_MARGIN * width),
        "topmost": (lambda obj: -_centre(obj)[1],
                    lambda best, second: best - second >= POSITION_MARGIN * height),
        "lowest": (lambda obj: _centre(obj)[1],
                   lambda best, second: best - second >= POSITION_MARGIN * height),
    }
    expressions = []
    for fields in (("shape",), ("colour", "shape"), ("colour",), ()):
        description = Description.of(target, fields)
        group = [obj for obj in objects if description.matches(obj)]
        if len(group) < 2:
            continue
        for word, (score, clear) in measures.items():
            ranked = sorted(group, key=score, reverse=True)
            if ranked[0] is target and clear(score(ranked[0]), score(ranked[1])):
                expressions.append(f"the {word} {description.text}")
    return expressions


def region_phrase(obj: SceneObject) -> str:
    """A Visual Genome-style phrase for the shape: "small red circle"."""
    return Description.of(obj, ("size", "colour", "shape")).text
