"""Tests for data_pipelines/builders/llava_instructions.py on a tiny LLaVA-layout json, and the
built examples through the data config's instruction op chain."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from configs import data as data_config
from data_pipelines.builders import llava_instructions as llava
from data_pipelines.ops import registry, slot
from data_pipelines.skips import BadRecordError, SkipCounter


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _turns(*pairs):
    return [{"from": speaker, "value": value} for pair in pairs
            for speaker, value in zip(("human", "gpt"), pair)]


BUS = np.full((4, 6, 3), 10, np.uint8)
DOG = np.full((5, 2, 3), 30, np.uint8)
HELD_OUT_IMAGE = "coco/train2017/000000000037.jpg"
SIGN = np.full((3, 3, 3), 20, np.uint8)
ENTRIES = [
    {"id": "000000000001", "image": "coco/train2017/000000000001.jpg",
     "conversations": _turns(("<image>\nWhat color is the bus?", "Red."),
                             ("Where is it going?", " Downtown. "),
                             ("Is it moving?\n<image>", "Yes"))},
    # The same image again, a marker in the middle of a turn; odd length (a trailing question).
    {"id": "000000000001", "image": "coco/train2017/000000000001.jpg",
     "conversations": _turns(("Describe this <image> picture briefly.", "A red bus.")) + [
         {"from": "human", "value": "And the driver?"}]},
    {"id": "ocr_1", "image": "ocr_vqa/images/sign.jpg",
     "conversations": _turns(("What does the sign say?\n<image>\nAnswer briefly.", "STOP"))},
    {"id": "text_only", "conversations": _turns(("Tell me a joke.", "No."))},       # no image
    {"id": "gone", "image": "gqa/images/404.jpg",
     "conversations": _turns(("What is here?", "Nothing."))},                     # file missing
    {"id": "broken", "image": "textvqa/train_images/broken.jpg",
     "conversations": _turns(("Read it.", "x"))},                                  # corrupt file
    {"id": "unasked", "image": "vg/VG_100K/1.jpg",
     "conversations": [{"from": "gpt", "value": "An answer first."}]
     + _turns(("<image>", "nothing asked"))},          # gpt first; then an empty question
    {"id": "escape", "image": "../outside.jpg", "conversations": _turns(("q", "a"))},
    {"id": "badturn", "image": "vg/VG_100K/1.jpg",
     "conversations": [{"from": "system", "value": "hi"}]},
    # An image the stable hash holds out (1 in 100), named by two entries, one of them with the
    # id of a training image's entries: split by image, not id. 17 pairs and a trailing
    # question: two examples (16 + 1 pairs), the question counted in held_out's skips.
    {"id": "000000000001", "image": HELD_OUT_IMAGE,
     "conversations": _turns(*((f"Question {k}?", f"Answer {k}.") for k in range(17))) + [
         {"from": "human", "value": "Unanswered?"}]},
    {"id": "held_2", "image": HELD_OUT_IMAGE,
     "conversations": _turns(("<image>\nHow many dogs?", "Two."))},
]
EXPECTED_SKIPS = {llava.UNANSWERED: 1, llava.TEXT_ONLY: 1, llava.MISSING_IMAGE: 1,
                  llava.CORRUPT_IMAGE: 1, llava.UNASKED: 1, llava.EMPTY_TURN: 1,
                  llava.NO_TURNS: 1, llava.BAD_FIELD: 2}


def _manual_dir(tmp_path, entries=ENTRIES, name="sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_"
                                                 "sam9k_div2k.json"):
    manual = tmp_path / "manual"
    for folder in ("coco/train2017", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K"):
        (manual / folder).mkdir(parents=True)
    (manual / "coco/train2017/000000000001.jpg").write_bytes(_png(BUS))
    (manual / HELD_OUT_IMAGE).write_bytes(_png(DOG))
    (manual / "ocr_vqa/images/sign.jpg").write_bytes(_png(SIGN))
    (manual / "textvqa/train_images/broken.jpg").write_bytes(_png(SIGN)[:30])
    (manual / "vg/VG_100K/1.jpg").write_bytes(_png(SIGN))
    (manual / name).write_text(json.dumps(entries))
    return manual


@pytest.fixture(scope="module")
def built(tmp_path_factory, build_dataset):
    tmp_path = tmp_path_factory.mktemp("llava")
    return build_dataset(llava.LlavaInstructions, manual_dir=_manual_dir(tmp_path),
                         data_dir=tmp_path / "data", config="sharegpt4v_mix665k")


def _examples(builder):
    source = builder.as_data_source()["train"]
    return sorted((source[i] for i in range(len(source))),
                  key=lambda e: (e["image/id"], len(e["turns"]["question"])))


def _pairs(example):
    return [(q.decode(), a.decode()) for q, a in zip(example["turns"]["question"],
                                                     example["turns"]["answer"])]


def test_each_entry_with_an_image_is_an_example_of_its_turn_pairs(built):
    first, second, sign = _examples(built)
    # The image two entries name is in both examples.
    assert first["image/id"] == second["image/id"] == b"000000000001"
    for example in (first, second):
        np.testing.assert_array_equal(example["image"], BUS)
        assert example["image/filename"] == b"coco/train2017/000000000001.jpg"
    assert _pairs(second) == [("What color is the bus?", "Red."),
                              ("Where is it going?", "Downtown."), ("Is it moving?", "Yes")]
    # The marker in the middle of a turn leaves one space; the trailing question is dropped.
    assert _pairs(first) == [("Describe this picture briefly.", "A red bus.")]
    # Between two lines, the marker leaves one newline.
    assert _pairs(sign) == [("What does the sign say?\nAnswer briefly.", "STOP")]
    assert (sign["image/height"], sign["image/width"]) == (3, 3)


def test_bad_entries_and_turns_are_counted(built):
    assert built.skip_counts == {"train": EXPECTED_SKIPS, "held_out": {llava.UNANSWERED: 1}}


def _all_examples(builder, split):
    source = builder.as_data_source()[split]
    return [source[i] for i in range(len(source))]


def test_held_out_images_are_a_split_of_their_own(built):
    train = _all_examples(built, "train")
    held_out = _all_examples(built, "held_out")
    assert {e["image/filename"] for e in held_out} == {HELD_OUT_IMAGE.encode()}
    assert HELD_OUT_IMAGE.encode() not in {e["image/filename"] for e in train}
    # Both entries of the held-out image, the long one in parts of 16 pairs in order.
    by_size = sorted(held_out, key=lambda e: -len(e["turns"]["question"]))
    assert [len(e["turns"]["question"]) for e in by_size] == [16, 1, 1]
    parts = [p for e in by_size for p in _pairs(e)]
    assert parts[:16] == [(f"Question {k}?", f"Answer {k}.") for k in range(16)]
    assert sorted(parts[16:]) == [("How many dogs?", "Two."), ("Question 16?", "Answer 16.")]
    assert sorted(e["image/id"] for e in held_out) == [b"000000000001", b"000000000001",
                                                        b"held_2"]
    for example in held_out:
        np.testing.assert_array_equal(example["image"], DOG)


def test_the_held_out_choice_is_a_stable_one_in_every():
    # Pinned: a hash that changed (or Python's salted hash) would move images between splits.
    paths = [f"coco/train2017/{n:012d}.jpg" for n in range(400)]
    held = [n for n, path in enumerate(paths) if llava.is_held_out(path, every=100)]
    assert held == [37, 173, 232, 240, 311]
    assert llava.is_held_out("coco\\train2017\\000000000037.jpg", every=100)
    many = sum(llava.is_held_out(f"gqa/images/{n}.jpg", every=100) for n in range(20000))
    assert 150 <= many <= 250
    assert sum(llava.is_held_out(f"gqa/images/{n}.jpg", every=10) for n in range(2000)) in (
        range(150, 250))


def test_held_out_every_must_hold_something_out():
    with pytest.raises(ValueError, match="held_out_every must be >= 2"):
        llava.LlavaInstructionsConfig(name="bad", json_file="x.json", held_out_every=1)


@pytest.mark.parametrize("text, expected", [
    ("<image>\nWhat is it?", "What is it?"),
    ("What is it?\n<image>", "What is it?"),
    ("What is <image> it?", "What is it?"),
    ("Look:<image>now", "Look: now"),
    ("One.\n<image> Two.", "One.\nTwo."),
    ("<image><image> Twice", "Twice"),
    ("no marker  kept  as typed ", "no marker  kept  as typed"),
])
def test_image_markers_are_removed_wherever_they_are(text, expected):
    assert llava.remove_image_markers(text) == expected


def test_turn_pairing_reports_odd_and_unordered_turns():
    skips = SkipCounter()
    pairs = llava.parse_turns(
        [{"from": "human", "value": "q1"}, {"from": "human", "value": "q2"},
         {"from": "gpt", "value": "a2"}, {"from": "gpt", "value": "a3"},
         {"from": "human", "value": "q4"}], skips=skips, file="x.json", record="entry 0")
    assert pairs == [("q2", "a2")]
    assert skips.counts() == {llava.UNANSWERED: 2, llava.UNASKED: 1}


def test_fail_policy_names_file_and_entry(tmp_path, build_dataset):
    manual = _manual_dir(tmp_path, entries=ENTRIES[:4], name="llava_v1_5_mix665k.json")
    with pytest.raises(BadRecordError, match=r"llava_v1_5_mix665k\.json: entry 1 \(id "
                                             r"'000000000001'\) turn 2: the conversation ends"):
        # These entries hold no image out; under "fail" an empty held_out split is refused.
        build_dataset(llava.LlavaInstructions, manual_dir=manual, data_dir=tmp_path / "data",
                      config="llava_v1_5_mix665k", skip_policy="fail", splits=["train"])


def test_a_missing_json_is_named(tmp_path, build_dataset):
    manual = _manual_dir(tmp_path, name="other.json")
    with pytest.raises(FileNotFoundError, match="llava_v1_5_mix665k.json"):
        build_dataset(llava.LlavaInstructions, manual_dir=manual, data_dir=tmp_path / "data",
                      config="llava_v1_5_mix665k")


def _through_slots(entry, record, seed=0):
    ops = [op for op in entry["ops"] if op["op"] != "tokenize"]
    return registry.compose(registry.parse(ops))(record, np.random.default_rng(seed))


@pytest.mark.parametrize("variant, slots", [("multitask", 16), ("smoke_multitask", 2)])
def test_built_examples_go_through_the_instruction_op_chain(built, variant, slots):
    config = data_config.get_config(variant)
    entry = next(e for e in config.train if e["name"] == "sharegpt4v_mix665k")
    assert (entry["builder"], entry["split"], entry["task"], entry["weight"]) == (
        "llava_instructions/sharegpt4v_mix665k", "train", "question_answer", 5.0)
    assert [op["op"] for op in entry["ops"]][:3] == ["decode", "task_prompt", "resize_and_pad"]
    record = _examples(built)[1]  # three pairs
    out = _through_slots(entry, record)
    used = out["slot_mask"]
    assert used.sum() == min(3, slots)
    expected = {f"Question: {q}Answer: ": a for q, a in _pairs(record)}
    for s in np.flatnonzero(used):
        assert expected[out[slot.SLOT_CONTEXT][s]] == out[slot.SLOT_TEXT][s]
    # Text only, with the whole image as the prompt box.
    assert out["task_text"][used].all() and not out["task_box"].any()
    assert not out["task_points"].any() and not out["task_mask"].any()
    canvas = config.sizes["canvas"]
    np.testing.assert_allclose(out["prompt_boxes"][0], [0, 0, canvas, round(canvas * 4 / 6)])


def test_tokenized_slots_hold_the_question_context_and_the_answer(built, tmp_path):
    import sentencepiece as spm

    from data_pipelines import pipeline
    from pixelllm.language.tokenizer import load_tokenizer

    model = io.BytesIO()
    corpus = ["Question: What color is the bus?Answer: Red.", "Where is it going? Downtown.",
              "Is it moving? Yes"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 20), model_writer=model,
                                   minloglevel=2, num_threads=1, character_coverage=1.0,
                                   vocab_size=60, hard_vocab_limit=False, pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1)
    path = tmp_path / "spiece.model"
    path.write_bytes(model.getvalue())
    config = data_config.get_config("multitask")
    entry = next(e for e in config.train if e["name"] == "sharegpt4v_mix665k")
    ops = registry.compose(registry.parse(pipeline.with_tokenizer(entry["ops"], str(path))))
    out = ops(_examples(built)[1], np.random.default_rng(0))
    tokenizer = load_tokenizer(str(path))
    expected = {"Red.": "Question: What color is the bus?Answer:",
                "Downtown.": "Question: Where is it going?Answer:",
                "Yes": "Question: Is it moving?Answer:"}
    used = np.flatnonzero(out["slot_mask"])
    assert sorted(tokenizer.decode(out["text_tokens"][s]) for s in used) == sorted(expected)
    for s in used:
        # The context holds at most Lc = 32 tokens (EOS included), as officially cut.
        context = tokenizer.decode(out["context_tokens"][s])
        assert len(context) > len("Question: ") and expected[
            tokenizer.decode(out["text_tokens"][s])].startswith(context)
        assert out["context_mask"][s].sum() <= 32


def test_held_out_examples_go_through_the_evaluation_chain(built):
    config = data_config.get_config("multitask")
    entry = next(e for e in config.eval if e["name"] == "sharegpt4v_mix665k_held_out")
    assert (entry["builder"], entry["split"], entry["task"]) == (
        "llava_instructions/sharegpt4v_mix665k", "held_out", "question_answer")
    longest = max(_all_examples(built, "held_out"), key=lambda e: len(e["turns"]["question"]))
    out = _through_slots(entry, longest)
    # Every pair of the example in its own slot, in order (evaluation scores them all).
    assert out["slot_mask"].all() and len(out["slot_mask"]) == 16
    assert list(out[slot.SLOT_CONTEXT]) == [f"Question: Question {k}?Answer: "
                                            for k in range(16)]
    assert list(out[slot.SLOT_TEXT]) == [f"Answer {k}." for k in range(16)]
    np.testing.assert_array_equal(out["original_wh"], [2, 5])
