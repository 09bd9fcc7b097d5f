"""The captioning evaluator (location-conditioned and COCO) on the real pycocoevalcap."""

import json

import pytest

from pixelllm.evaluators.caption_metrics import MeteorProcess
from pixelllm.evaluators.captioning import CaptioningEvaluator

REFERENCES = [["a man riding a brown horse"], ["a red car parked on the street"],
              ["two dogs playing in the grass"], ["a white plate with a sandwich"]]


def test_location_captioning_items_and_duplicates(meteor, tmp_path):
    good = CaptioningEvaluator(split="vg_loca/test", meteor=meteor)
    good.add(item_ids=[1, 2], candidates=["a man riding a brown horse", "a red car on the street"],
             references=REFERENCES[:2])
    good.add(item_ids=[3, 4, 1], candidates=["two dogs playing in grass", "a plate with food",
                                             "a bowl of soup"],
             references=REFERENCES[2:] + REFERENCES[:1])  # item 1 again: skipped
    bad = CaptioningEvaluator(split="vg_loca/test", meteor=meteor)
    bad.add(item_ids=[1, 2, 3, 4], candidates=["a bowl of soup", "the sky at night",
                                               "an old clock", "a blue train"],
            references=REFERENCES)
    assert len(good) == 4
    good_metrics, bad_metrics = good.result(), bad.result()
    for key in ("METEOR", "CIDEr", "BLEU-4", "ROUGE-L"):
        assert good_metrics[key] > bad_metrics[key] + 0.1, key
    assert good_metrics["num_items"] == 4.0 and good_metrics["num_duplicates_skipped"] == 1.0
    good.write_json(tmp_path / "eval" / "loca.json")
    written = json.loads((tmp_path / "eval" / "loca.json").read_text())
    assert written["split"] == "vg_loca/test"
    assert written["metrics"]["CIDEr"] == pytest.approx(good_metrics["CIDEr"])


def test_bad_items_are_named():
    evaluator = CaptioningEvaluator(split="coco/val", meteor=MeteorProcess())
    with pytest.raises(ValueError, match="coco/val.*differ in length"):
        evaluator.add(item_ids=[1, 2], candidates=["a"], references=[["a"]])
    with pytest.raises(ValueError, match="item 7: references must be a non-empty list"):
        evaluator.add(item_ids=[7], candidates=["a"], references=[[]])
    with pytest.raises(ValueError, match="item 7: references must be"):
        evaluator.add(item_ids=[7], candidates=["a"], references=["a cat"])
    with pytest.raises(ValueError, match="no item was added"):
        evaluator.result()
