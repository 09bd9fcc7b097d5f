"""F-LMM's RefCOCO samples from a refer_coco data set built from refer-toolkit files in the
public layout (the builder test's file writers), checked against a transcription of
mmdetection 3.3's RefCocoDataset and F-LMM's RefCOCO2PNG with transformers' Llama tokenizer."""

import collections
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
import transformers

from data_pipelines import flmm_inputs
from data_pipelines.builders import refcoco
from pixelllm.language.sentencepiece_tokenizer import SentencePieceTokenizer
from tests import llama_sentencepiece
from tests.data_pipelines.builders import test_refcoco as refer_files

# Image 21 (6 x 8): train refs 0, 1, 2 (refs 0 and 2 name annotation 201) and a val ref 5;
# image 22 (5 x 5): val refs 3, 4. Refs are listed out of ref_id order in the pickle only where
# it does not matter to mmdetection (different images).
IMAGES = {21: (6, 8), 22: (5, 5)}
POLYGONS = {201: [[0, 0, 3, 0, 3, 4, 0, 4]], 202: [[4, 1, 8, 1, 8, 3, 4, 3]],
            203: [[1, 1, 4, 1, 4, 4, 1, 4]], 204: [[0, 3, 2, 3, 2, 5, 0, 5]]}
ANNOTATIONS = [refer_files._ann(201, 21, [0, 0, 3, 4], POLYGONS[201]),
               refer_files._ann(202, 21, [4, 1, 4, 2], POLYGONS[202], category=3),
               refer_files._ann(203, 22, [1, 1, 3, 3], POLYGONS[203], category=18),
               refer_files._ann(204, 22, [0, 3, 2, 2], POLYGONS[204], category=17)]
REFS = [
    refer_files._ref(3, 203, 22, "val", [(30, "The Dog!"), (31, "puppy on rug")]),
    refer_files._ref(4, 204, 22, "val", [(32, "Cat, lower left ")]),
    refer_files._ref(0, 201, 21, "train", [(1, "The Man ON the left"), (2, "guy"),
                                           (3, "left person")]),
    refer_files._ref(1, 202, 21, "train", [(4, "Red Car"), (5, "car at right")]),
    refer_files._ref(2, 201, 21, "train", [(6, "Tall man"), (7, "person standing")]),
    refer_files._ref(5, 202, 21, "val", [(8, "the red car"), (9, "vehicle")]),
]
CORPUS = [s for ref in REFS for s in (x["raw"].lower() for x in ref["sentences"])] + [
    "a man and a dog. the car is red. a cat on the left. person, guy, vehicle. puppy rug."]


def _manual_dir(root):
    manual = root / "refer_manual"
    (manual / "refcoco").mkdir(parents=True)
    (manual / "refcoco" / "refs(unc).p").write_bytes(
        refer_files._py2_pickle(refer_files._py2(REFS)))
    instances = {"images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg",
                             "height": h, "width": w} for i, (h, w) in IMAGES.items()],
                 "annotations": ANNOTATIONS,
                 "categories": [{"id": c, "name": f"c{c}"} for c in (1, 3, 17, 18)]}
    (manual / "refcoco" / "instances.json").write_text(json.dumps(instances))
    (manual / "train2014").mkdir()
    rng = np.random.default_rng(0)
    for image_id, (h, w) in IMAGES.items():
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (manual / "train2014" / f"COCO_train2014_{image_id:012d}.jpg").write_bytes(
            refer_files._png(pixels))
    return manual


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """``{(split, image id): example}`` of the built refcoco_unc data set."""
    root = tmp_path_factory.mktemp("flmm_refcoco")
    builder = refcoco.ReferCoco(data_dir=root / "data", config="refcoco_unc")
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(_manual_dir(root))))
    out = {}
    for split in ("train", "val"):
        source = builder.as_data_source()[split]
        for i in range(len(source)):
            out[split, source[i]["image/id"].decode()] = source[i]
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """``(ours, transformers')`` over one tiny Llama-style SentencePiece model."""
    root = tmp_path_factory.mktemp("flmm_tokenizer")
    path = llama_sentencepiece.write_model(root, CORPUS, vocab_size=330, hard_vocab_limit=False)
    return (SentencePieceTokenizer(path),
            transformers.LlamaTokenizer.from_pretrained(str(root)))


def _mmdet_view(split):
    """mmdetection 3.3 RefCocoDataset.load_data_list with text_mode='select_first',
    transcribed: {image id: [(text, annotation id)]}."""
    anns = {ann["id"]: dict(ann) for ann in ANNOTATIONS}
    refs = {ref["ref_id"]: ref for ref in REFS}
    ref_to_ann = {ref["ref_id"]: anns[ref["ann_id"]] for ref in REFS}
    full_anno = []
    for ref_id in [ref["ref_id"] for ref in REFS if ref["split"] == split]:
        ann = ref_to_ann[ref_id]
        ann.update(refs[ref_id])
        full_anno.append(ann)
    final_anno = {anno["ann_id"]: anno for anno in full_anno}
    grounding = collections.defaultdict(list)
    for anno in final_anno.values():
        grounding[int(anno["image_id"])].append(anno)
    view = {}
    for image_id, annos in grounding.items():
        texts = [[x["raw"].lower() for x in anno["sentences"]] for anno in annos]
        view[str(image_id)] = [(t[0], anno["id"]) for t, anno in zip(texts, annos)]
    return view


def _flmm_caption(phrases, hf):
    """RefCOCO2PNG.transform_concat's caption ids and mask_ids (after the prompt)."""
    split_token_id = hf.encode(".", add_special_tokens=False)[-1]
    ids, mask_ids = [], []
    for inst_id, text in enumerate(phrases):
        segment = hf.encode(text, add_special_tokens=False)
        ids += segment
        mask_ids += [inst_id] * len(segment)
        ids.append(split_token_id)
        mask_ids.append(-1)
    return ids, mask_ids


@pytest.mark.parametrize("split", ["train", "val"])
def test_eval_sample_matches_mmdetection_and_refcoco2png(examples, tokenizers, split):
    ours, hf = tokenizers
    view = _mmdet_view(split)
    for image_id, expected in view.items():
        sample = flmm_inputs.refcoco_eval_sample(examples[split, image_id], tokenizer=ours)
        assert list(sample["phrases"]) == [text for text, _ in expected]
        assert list(sample["mask_ids"]) == [f"{image_id}/{ann}" for _, ann in expected]
        height, width = IMAGES[int(image_id)]
        masks = np.stack([refcoco.render_mask(POLYGONS[ann], height=height, width=width)
                          for _, ann in expected])
        np.testing.assert_array_equal(sample["masks"], masks)
        assert sample["masks"].dtype == np.uint8 and sample["masks"].any(axis=(1, 2)).all()
        ids, mask_ids = _flmm_caption(sample["phrases"], hf)
        assert sample["caption_tokens"].tolist() == ids
        spans = [(mask_ids.index(k), len(mask_ids) - mask_ids[::-1].index(k))
                 for k in range(len(expected))]
        assert [tuple(s) for s in sample["phrase_spans"].tolist()] == spans
        assert sample["caption"] == ours.decode(ids)
        assert sample["original_hw"].tolist() == [height, width]
        assert sample["image"].shape == (height, width, 3)


def test_refs_of_one_annotation_are_one_object_with_the_last_refs_sentences(examples, tokenizers):
    sample = flmm_inputs.refcoco_eval_sample(examples["train", "21"], tokenizer=tokenizers[0])
    # Refs 0 and 2 both name annotation 201: one phrase, first place, ref 2's first sentence.
    assert sample["phrases"] == ("tall man", "red car")
    assert sample["sentence_ids"].tolist() == [6, 4]
    val = flmm_inputs.refcoco_eval_sample(examples["val", "22"], tokenizer=tokenizers[0])
    # raw lower-cased, punctuation and trailing space kept (not the builder's `sent`).
    assert val["phrases"] == ("the dog!", "cat, lower left ")


def test_train_sample_draws_one_sentence_per_object_fixed_for_the_seed(examples, tokenizers):
    ours = tokenizers[0]
    example = examples["val", "21"]  # one object, sentences "the red car" / "vehicle"
    drawn = {flmm_inputs.refcoco_train_sample(example, tokenizer=ours, seed=seed)["phrases"]
             for seed in range(40)}
    assert drawn == {("the red car",), ("vehicle",)}
    first = flmm_inputs.refcoco_train_sample(examples["train", "21"], tokenizer=ours, seed=3)
    again = flmm_inputs.refcoco_train_sample(examples["train", "21"], tokenizer=ours, seed=3)
    assert first["phrases"] == again["phrases"]
    assert first["phrases"][0] in ("tall man", "person standing")
    assert first["phrases"][1] in ("red car", "car at right")
    assert first["mask_ids"] == ("21/201", "21/202")


def test_caption_tokens_refuses_a_phrase_without_tokens(tokenizers):
    with pytest.raises(ValueError, match="phrase 1 '' gives no token"):
        flmm_inputs.caption_tokens(["a man", ""], tokenizers[0])
    with pytest.raises(ValueError, match="seed must be >= 0"):
        flmm_inputs.refcoco_train_sample({}, tokenizer=tokenizers[0], seed=-1)


def test_errors_name_the_example_and_field(examples, tokenizers):
    example = dict(examples["val", "22"])
    example["expressions"] = {**example["expressions"],
                              "object": np.array([0, 5], np.int32)}
    with pytest.raises(ValueError, match="example 22: field 'expressions/object' 5"):
        flmm_inputs.refcoco_eval_sample(example, tokenizer=tokenizers[0])
    with pytest.raises(ValueError, match="example 22: no field 'objects'"):
        flmm_inputs.refcoco_eval_sample({k: v for k, v in examples["val", "22"].items()
                                         if k != "objects"}, tokenizer=tokenizers[0])
