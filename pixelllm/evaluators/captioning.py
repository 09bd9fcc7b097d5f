"""Caption evaluation: location-conditioned captioning (VG test, RefCOCOg val: one item per
region or referring expression, prompted with its ground-truth box, against its single reference)
and image captioning (COCO: one item per image against its references).

Items are PTB-tokenized and scored with METEOR 1.5 (corpus), CIDEr-D, BLEU-1..4 and ROUGE-L
(:func:`caption_metrics.caption_metrics`), as the official location-captioning evaluator. Keys
(fractions; the paper prints x 100): ``METEOR``, ``CIDEr``, ``BLEU-1`` .. ``BLEU-4``, ``ROUGE-L``,
``num_items``, ``num_duplicates_skipped``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from pixelllm.evaluators.caption_metrics import MeteorProcess, caption_metrics
from pixelllm.evaluators.results_file import write_results


class CaptioningEvaluator:
    """Accumulates (candidate, references) items of one split and scores them together.

    Args:
      split: the split's name, written to the JSON (e.g. ``"vg_loca/test"``).
      meteor: the METEOR process shared by the evaluation (one JVM).
    """

    def __init__(self, *, split: str, meteor: MeteorProcess):
        self.split = split
        self.meteor = meteor
        self._candidates: dict[str, str] = {}
        self._references: dict[str, list[str]] = {}
        self._duplicates = 0

    def __len__(self) -> int:
        """Number of items added."""
        return len(self._candidates)

    def add(self, *, item_ids: Sequence[int | str], candidates: Sequence[str],
            references: Sequence[Sequence[str]]) -> None:
        """Adds N items; an item id added before is skipped (evaluation padding may repeat
        examples).

        Args:
          item_ids: ``[N]`` unique ids (region, expression or image ids).
          candidates: ``[N]`` generated captions.
          references: ``[N]`` lists of reference captions, each non-empty.
        """
        where = f"CaptioningEvaluator({self.split!r})"
        if not len(item_ids) == len(candidates) == len(references):
            raise ValueError(f"{where}: {len(item_ids)} item_ids, {len(candidates)} candidates "
                             f"and {len(references)} reference lists differ in length")
        for item_id, candidate, refs in zip(item_ids, candidates, references):
            if not isinstance(candidate, str):
                raise ValueError(f"{where} item {item_id!r}: the candidate must be a string, got "
                                 f"{candidate!r}")
            if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"{where} item {item_id!r}: references must be a non-empty "
                                 f"list of strings, got {refs!r}")
            key = str(item_id)
            if key in self._candidates:
                self._duplicates += 1
                continue
            self._candidates[key] = candidate
            self._references[key] = list(refs)

    def result(self) -> dict[str, float]:
        """The split's metrics (module docstring for the keys)."""
        if not self._candidates:
            raise ValueError(f"CaptioningEvaluator({self.split!r}): no item was added")
        metrics = caption_metrics(list(self._candidates.values()),
                                  list(self._references.values()), meteor=self.meteor)
        metrics["num_items"] = float(len(self._candidates))
        metrics["num_duplicates_skipped"] = float(self._duplicates)
        return metrics

    def write_json(self, path: str | pathlib.Path) -> None:
        """Writes ``{"split", "metrics"}`` to ``path`` (parent folders created)."""
        write_results(path, {"split": self.split, "metrics": self.result()})
