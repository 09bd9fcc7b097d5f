"""LISA's samples from ReasonSeg and RefCOCO examples built in memory (the fields the builders
write), with a tiny Llama-style tokenizer holding LISA's added tokens."""

import numpy as np
import pytest
import transformers
from PIL import Image

from data_pipelines import lisa_inputs
from pixelllm.language.hf_tokenizer import HFTokenizer
from pixelllm.models.lisa import conversation
from tests import llama_sentencepiece

ADDED = ("<im_patch>", "<im_start>", "<im_end>", "[SEG]")
CORPUS = ["Can you segment the red apple in this image?", "Please output segmentation mask.",
          "A chat between a curious human and an artificial intelligence assistant.",
          "The assistant gives helpful, detailed, and polite answers to the human's questions.",
          "USER: ASSISTANT: It is. Sure, the segmentation result is the food with most vitamin C",
          "What is the thing that keeps people dry in the rain? Please respond with it."]
SIZES = lisa_inputs.LisaSizes(conversations=3, prompt_before=160, prompt_after=96, tokens=64,
                              max_masks=3, mask_hw=(12, 16), clip_image_size=8,
                              sam_image_size=20)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("lisa_inputs_tokenizer")
    llama_sentencepiece.write_model(root / "sp", CORPUS, vocab_size=360)
    hf = transformers.LlamaTokenizer.from_pretrained(str(root / "sp"), add_bos_token=True)
    # LISA's added tokens, in the model's row order; [SEG] is an ordinary added token as in
    # LISA's train_ds.py.
    hf.add_tokens(list(ADDED[:3]), special_tokens=True)
    hf.add_tokens(ADDED[3])
    hf.save_pretrained(str(root / "lisa"))
    return HFTokenizer(root / "lisa" / "tokenizer.json")


@pytest.fixture(scope="module")
def seg_id(tokenizer):
    return tokenizer.vocab_size - 1


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def reason_seg_example(*, queries=("the red apple", "Second Thing", "third", "fourth"),
                       is_sentence=False, explanations=()):
    mask = np.zeros((10, 14), np.uint8)
    mask[2:6, 3:9] = 1
    mask[3, 4] = 255
    return {"image": _image(10, 14), "image/id": b"img7",
            "queries": np.array([q.encode() for q in queries], dtype=object),
            "is_sentence": np.bool_(is_sentence), "mask": mask[..., None],
            "explanations": {
                "query": np.array([e[0].encode() for e in explanations], dtype=object),
                "outputs": np.array([e[1].encode() for e in explanations], dtype=object),
                "query_index": np.full(len(explanations), -1, np.int32)}}


def refcoco_example(num_sentences=5):
    masks = np.zeros((2, 9, 11, 1), np.uint8)
    masks[0, 1:4, 1:5] = 255
    masks[1, 5:8, 6:10] = 255
    objects = np.arange(num_sentences) % 2
    return {"image": _image(9, 11, 1), "image/id": b"581857",
            "objects": {"id": np.array([10, 11]), "ref_id": np.array([1, 2]),
                        "box": np.zeros((2, 4), np.float32), "category": np.array([1, 2]),
                        "mask": masks},
            "expressions": {"object": objects.astype(np.int32),
                            "text": np.array([f"Left Cup {i} ".encode()
                                              for i in range(num_sentences)], dtype=object),
                            "id": np.arange(100, 100 + num_sentences)}}


def _answers(sample, tokenizer):
    """Each valid conversation's labelled tokens, decoded with special tokens."""
    out = []
    for tokens, labels, valid in zip(sample["tokens"], sample["label_mask"],
                                     sample["token_mask"]):
        if valid.any():
            out.append(tokens[labels])
    return out


def test_training_sample_shapes_seg_positions_and_masks(tokenizer, seg_id):
    sample = lisa_inputs.reason_seg_train_sample(
        reason_seg_example(), tokenizer=tokenizer, seg_token_id=seg_id, sizes=SIZES,
        rng=np.random.default_rng(0))
    assert sample["clip_pixels"].shape == (8, 8, 3)
    assert sample["sam_pixels"].shape == (20, 20, 3)
    assert sample["tokens"].shape == sample["label_mask"].shape == (3, 64)
    assert sample["prompt_before"].shape == (3, 160)
    assert sample["prompt_after"].shape == (3, 96)
    np.testing.assert_array_equal(sample["original_hw"], [10, 14])
    np.testing.assert_array_equal(sample["resized_hw"], [14, 20])   # 10 * 20 / 14 = 14.29
    np.testing.assert_array_equal(sample["mask_valid"], [True] * 3)
    assert len(set(sample["mask_ids"])) == 3
    assert all(i.startswith("img7/") for i in sample["mask_ids"])
    answers = [tokenizer.decode(list(a)) for a in _answers(sample, tokenizer)]
    for conv in range(3):
        tokens = sample["tokens"][conv][sample["token_mask"][conv]]
        labels = sample["label_mask"][conv][sample["token_mask"][conv]]
        # Text token 0 is the prompt's last token, unlabelled; the answer and </s> follow.
        assert not labels[0] and labels[1:].all()
        assert tokens[-1] == tokenizer.eos_id
        assert list(tokens).count(seg_id) == 1
        # The [SEG] is where the chosen answer puts it: decode the answer around it.
        answer = sample["tokens"][conv][1:int(sample["token_mask"][conv].sum()) - 1]
        seg_at = list(answer).index(seg_id)
        text = tokenizer.decode(list(answer[:seg_at])).strip()
        assert text in {a.split("[SEG]")[0].strip() for a in conversation.ANSWER_LIST}
    assert len(answers) == 3
    # Training targets are LISA's mask == 1: the 255 pixel is background, padding is zero.
    expected = np.zeros((12, 16), np.uint8)
    expected[2:6, 3:9] = 1
    expected[3, 4] = 0
    for m in range(3):
        np.testing.assert_array_equal(sample["masks"][m], expected)
    assert sample["pixel_valid"][:10, :14].all() and sample["pixel_valid"].sum() == 140


def test_sampling_is_deterministic_per_seed_and_varies_across_seeds(tokenizer, seg_id):
    def sample(seed):
        return lisa_inputs.reason_seg_train_sample(
            reason_seg_example(), tokenizer=tokenizer, seg_token_id=seg_id, sizes=SIZES,
            rng=np.random.default_rng(seed))
    first, again = sample(3), sample(3)
    for key in ("tokens", "prompt_after", "masks"):
        np.testing.assert_array_equal(first[key], again[key])
    assert first["mask_ids"] == again["mask_ids"]
    # 3 of 4 queries drawn without replacement: distinct, and not always the same.
    assert len(set(first["mask_ids"])) == 3
    assert len({sample(seed)["mask_ids"] for seed in range(8)}) > 1


def test_fewer_queries_than_slots_take_all_in_order(tokenizer, seg_id):
    sample = lisa_inputs.reason_seg_train_sample(
        reason_seg_example(queries=("What keeps people dry in the rain?",), is_sentence=True),
        tokenizer=tokenizer, seg_token_id=seg_id, sizes=SIZES, rng=np.random.default_rng(0))
    assert sample["mask_ids"] == ("img7/0",)
    np.testing.assert_array_equal(sample["mask_valid"], [True, False, False])
    assert not sample["token_mask"][1:].any() and not sample["prompt_before_mask"][1:].any()
    assert not sample["masks"][1:].any()
    prompt = tokenizer.decode(list(sample["prompt_after"][0][sample["prompt_after_mask"][0]]))
    # A sentence query takes a long question, verbatim (not lower-cased).
    assert "What keeps people dry in the rain? Please" in prompt


def test_explanatory_modes(tokenizer, seg_id):
    example = reason_seg_example(explanations=[("q", "Old text."), ("q", "Apples are red.")])
    text_only = lisa_inputs.reason_seg_train_sample(
        example, tokenizer=tokenizer, seg_token_id=seg_id, sizes=SIZES,
        rng=np.random.default_rng(0), explanatory=1.0)
    assert not text_only["mask_valid"].any() and text_only["mask_ids"] == ()
    for answer in _answers(text_only, tokenizer):
        assert seg_id not in answer
        assert tokenizer.decode(list(answer)).strip() == "Apples are red."   # the last entry
    modes = set()
    for seed in range(12):
        sample = lisa_inputs.reason_seg_train_sample(
            example, tokenizer=tokenizer, seg_token_id=seg_id, sizes=SIZES,
            rng=np.random.default_rng(seed), explanatory=0.0)
        assert sample["mask_valid"].all()
        answers = [tokenizer.decode(list(a)) for a in _answers(sample, tokenizer)]
        explained = ["Apples are red." in a for a in answers]
        assert len(set(explained)) == 1      # the mode is drawn once per image
        modes.add(explained[0])
    assert modes == {True, False}
    # explanatory < 0 (LISA's -1) ignores explanations.
    plain = lisa_inputs.reason_seg_train_sample(
        example, tokenizer=tokenizer, seg_token_id=seg_id, sizes=SIZES,
        rng=np.random.default_rng(0), explanatory=-1)
    assert not any("Apples" in tokenizer.decode(list(a)) for a in _answers(plain, tokenizer))


def test_validation_sample_keeps_ignored_pixels_and_answers_seg(tokenizer, seg_id):
    sample = lisa_inputs.reason_seg_val_sample(
        reason_seg_example(), tokenizer=tokenizer, seg_token_id=seg_id, sizes=SIZES)
    assert sample["mask_ids"] == ("img7/0",)
    np.testing.assert_array_equal(sample["mask_valid"], [True, False, False])
    assert sample["masks"][0, 3, 4] == 255 and sample["masks"][0, 2, 3] == 1
    answer = _answers(sample, tokenizer)
    assert len(answer) == 1
    # The answer opens with [SEG] (after at most a SentencePiece word-prefix piece).
    seg_at = list(answer[0]).index(seg_id)
    assert tokenizer.decode(list(answer[0][:seg_at])).strip() == ""
    assert answer[0][-1] == tokenizer.eos_id
    assert tokenizer.decode(list(answer[0])).strip() == "[SEG]."
    prompt = tokenizer.decode(list(sample["prompt_after"][0][sample["prompt_after_mask"][0]]))
    assert "What is the red apple in this image? Please output segmentation mask." in prompt


def test_refcoco_samples(tokenizer, seg_id):
    example = refcoco_example(5)
    train = lisa_inputs.refcoco_train_sample(example, tokenizer=tokenizer, seg_token_id=seg_id,
                                             sizes=SIZES, rng=np.random.default_rng(1))
    assert train["mask_valid"].all()
    for mask_id, mask in zip(train["mask_ids"], train["masks"]):
        owner = (int(mask_id.split("/")[1]) - 100) % 2
        expected = (example["objects"]["mask"][owner, ..., 0] > 0)
        np.testing.assert_array_equal(mask[:9, :11], expected.astype(np.uint8))
        assert set(np.unique(mask)) <= {0, 1}
    val = lisa_inputs.refcoco_val_samples(example, tokenizer=tokenizer, seg_token_id=seg_id,
                                          sizes=SIZES)
    assert [s["mask_ids"] for s in val] == [
        ("581857/100", "581857/101", "581857/102"), ("581857/103", "581857/104")]
    np.testing.assert_array_equal(val[1]["mask_valid"], [True, True, False])
    prompt = tokenizer.decode(list(val[0]["prompt_after"][1][val[0]["prompt_after_mask"][1]]))
    assert "What is left cup 1 in this image?" in prompt


def test_clip_pixels_match_clip_image_processor():
    # The PIL backend: the processor of LISA's transformers version (PIL bicubic on uint8).
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    processor = CLIPImageProcessorPil(size={"shortest_edge": 8},
                                      crop_size={"height": 8, "width": 8})
    for shape in ((10, 14), (17, 9), (8, 8)):
        image = _image(*shape, seed=shape[0])
        expected = processor.preprocess(image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(lisa_inputs.clip_pixels(image, size=8),
                                   expected.transpose(1, 2, 0), atol=1e-5)


def test_sam_pixels_resize_longest_side_normalize_and_pad():
    assert lisa_inputs.sam_resized_hw(3, 8, size=20) == (8, 20)      # 7.5 rounds up
    assert lisa_inputs.sam_resized_hw(480, 640, size=1024) == (768, 1024)
    image = _image(3, 8)
    pixels, resized_hw = lisa_inputs.sam_pixels(image, size=20)
    assert resized_hw == (8, 20)
    resized = np.asarray(Image.fromarray(image).resize((20, 8), Image.Resampling.BILINEAR))
    expected = (resized - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    np.testing.assert_allclose(pixels[:8], expected, atol=1e-5)
    assert not pixels[8:].any()


def test_collate_and_lisa_inputs(tokenizer, seg_id):
    samples = [lisa_inputs.reason_seg_val_sample(reason_seg_example(), tokenizer=tokenizer,
                                                 seg_token_id=seg_id, sizes=SIZES),
               lisa_inputs.refcoco_val_samples(refcoco_example(2), tokenizer=tokenizer,
                                               seg_token_id=seg_id, sizes=SIZES)[0]]
    batch = lisa_inputs.collate(samples)
    inputs = lisa_inputs.lisa_inputs(batch)
    assert inputs.tokens.shape == (2, 3, 64) and inputs.sam_pixels.shape == (2, 20, 20, 3)
    assert inputs.original_hw.tolist() == [[10, 14], [9, 11]]
    assert batch["masks"].shape == (2, 3, 12, 16)
    assert batch["mask_ids"] == [["img7/0"], ["581857/100", "581857/101"]]
    other = lisa_inputs.reason_seg_val_sample(
        reason_seg_example(), tokenizer=tokenizer, seg_token_id=seg_id,
        sizes=lisa_inputs.LisaSizes(**{**SIZES.__dict__, "tokens": 32}))
    with pytest.raises(ValueError, match="field 'tokens' has shapes"):
        lisa_inputs.collate([samples[0], other])


def test_errors_name_the_example_and_field(tokenizer, seg_id):
    small = lisa_inputs.LisaSizes(**{**SIZES.__dict__, "mask_hw": (8, 8)})
    with pytest.raises(ValueError, match="example img7: field 'image' is 10x14"):
        lisa_inputs.reason_seg_val_sample(reason_seg_example(), tokenizer=tokenizer,
                                          seg_token_id=seg_id, sizes=small)
    short = lisa_inputs.LisaSizes(**{**SIZES.__dict__, "prompt_before": 4})
    with pytest.raises(ValueError, match="example img7 field 'prompt_before'"):
        lisa_inputs.reason_seg_val_sample(reason_seg_example(), tokenizer=tokenizer,
                                          seg_token_id=seg_id, sizes=short)
    bad = reason_seg_example()
    del bad["mask"]
    with pytest.raises(ValueError, match="example img7: no field 'mask'"):
        lisa_inputs.reason_seg_val_sample(bad, tokenizer=tokenizer, seg_token_id=seg_id,
                                          sizes=SIZES)
    with pytest.raises(ValueError, match=r"example img7: the answers hold 0 \[SEG\]"):
        lisa_inputs.reason_seg_val_sample(reason_seg_example(), tokenizer=tokenizer,
                                          seg_token_id=seg_id - 1, sizes=SIZES)
