"""The Predictor on the tiny model: every task equals its inference entry on the same canvas
inputs (coordinates mapped to the user's frame by hand here), coordinates round-trip, another
image size in the same bucket does not recompile, and ``from_workdir`` restores a run's latest
checkpoint without touching the work dir, and a run whose stage builds no mask adapter or proposal
head names the tasks it cannot run.

The work dir is written with the trainer's own functions (``write_config``, ``build_model``
and the ``Checkpointer``) instead of by a training run: compiling the train step would cost
about a minute on 2 cores, and the restore path reads only the config and the ``params`` item.
"""

import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx

from configs import stages
from data_pipelines.ops import fields
from data_pipelines.ops.resize_and_pad import resize_and_pad
from data_pipelines.ops.tokenize import Encoder
from pixelllm import predictor as predictor_lib
from pixelllm import tasks
from pixelllm.evaluators.refcoco import mask_logits_to_original
from pixelllm.models.pixel_llm import inference
from pixelllm.train import trained_set, trainer
from pixelllm.train.checkpointing import Checkpointer

# Module fixtures compile the tiny model: all of this module runs on one xdist worker
# (launch/test.sh uses --dist loadgroup), so they are built once.
pytestmark = pytest.mark.xdist_group("test_predictor")

CAPTIONS = ["a dog on the grass", "the cat on the right", "a red car on the left",
            "where is the dog", "an object of a red car"]
MAX_NEW_TOKENS = 4
SAVED_STEP = 2
# A half-written step of a trainer that is still running: a restore must neither read nor
# remove it.
IN_FLIGHT = f"{SAVED_STEP + 1}.orbax-checkpoint-tmp-1234"
# The tiny stage that builds every module (mask adapter and proposal head): every task runs.
STAGE = "multitask_refseg_tiny"


def make_tiny_workdir(root: Path, *, stage: str = STAGE) -> tuple[Path, nnx.Module]:
    """``(workdir, model)``: a ``stage`` run's work dir whose checkpoint at step 2 holds
    trained parameters moved away from their initialization, and that model."""
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS * 20),
                                   model_writer=model_file, minloglevel=2, num_threads=1,
                                   character_coverage=1.0, model_type="unigram", vocab_size=40,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1)
    root.mkdir(parents=True, exist_ok=True)
    (root / "spiece.model").write_bytes(model_file.getvalue())
    config = stages.get_config(stage)
    config.data.tokenizer = str(root / "spiece.model")
    config.mesh_shape = (1, 1, 1)
    workdir = root / "run"
    trainer.write_config(config, workdir)
    model, _, _ = trainer.build_model(config)
    trained = trained_set.trained_filter(model, tuple(config.frozen))
    params = nnx.state(model, trained)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    moved = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                         for x, k in zip(leaves, keys)])
    nnx.update(model, moved)
    with Checkpointer(workdir / trainer.CHECKPOINTS) as checkpointer:
        checkpointer.save(SAVED_STEP, {"params": moved}, force=True)
    (workdir / trainer.CHECKPOINTS / IN_FLIGHT).mkdir()
    return workdir, model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_workdir(tmp_path_factory.mktemp("predictor"))


@pytest.fixture(scope="module")
def predictor(run):
    return predictor_lib.Predictor.from_workdir(run[0], max_new_tokens=MAX_NEW_TOKENS)


def test_a_run_without_mask_adapter_or_detector_names_the_tasks_it_cannot_run(tmp_path):
    # trace builds neither module (the official trace stage does not).
    workdir, _ = make_tiny_workdir(tmp_path, stage="trace_tiny")
    predictor = predictor_lib.Predictor.from_workdir(workdir, max_new_tokens=MAX_NEW_TOKENS)
    assert predictor.unavailable == {"refseg": ("mask_adapter",),
                                     "densecap": ("proposal_head",)}
    image = np.zeros((10, 20, 3), np.uint8)
    with pytest.raises(ValueError, match=r"task 'refseg' cannot run on this model: "
                                         r"config\.model\.mask_adapter is None"):
        predictor.segment([image], ["the dog"])
    with pytest.raises(ValueError, match=r"task 'densecap' .*config\.model\.proposal_head is None"):
        predictor.dense_caption([image])
    assert predictor.traces == {}


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_from_workdir_restores_the_latest_checkpoint_and_writes_nothing(run, predictor):
    workdir, model = run
    before = _listing(workdir)
    again = predictor_lib.Predictor.from_workdir(workdir, max_new_tokens=MAX_NEW_TOKENS)
    assert _listing(workdir) == before
    assert (workdir / trainer.CHECKPOINTS / IN_FLIGHT).is_dir()
    # Trained parameters from the checkpoint, frozen ones rebuilt from the seed: the model the
    # checkpoint was written from, exactly.
    expected = jax.tree.leaves(nnx.state(model))
    for found in (predictor.parameter_arrays, again.parameter_arrays):
        for a, b in zip(found, expected, strict=True):
            np.testing.assert_array_equal(a, b)


def test_from_workdir_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        predictor_lib.Predictor.from_workdir(tmp_path)
    trainer.write_config(stages.get_config("trace_tiny"), tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        predictor_lib.Predictor.from_workdir(tmp_path)
    assert _listing(tmp_path) == ["config.json"]


def _canvas(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation pipeline's op on ``image``: ``(canvas image, valid_wh)``."""
    out = resize_and_pad(canvas=32)({fields.IMAGE: image}, np.random.default_rng(0))
    return out[fields.IMAGE], out[fields.VALID_WH]


def _rows(encode, texts, extra_tokens, slots=True):
    """Padded rows of ``texts`` at the predictor's length bucket (``extra_tokens``: EOS, and
    BOS for texts)."""
    tokenizer = encode.__self__.tokenizer
    length = predictor_lib.bucket(max(len(tokenizer.encode(t)) for t in texts) + extra_tokens,
                                  minimum=8)
    rows = [encode(text, length=length) for text in texts]
    tokens, mask = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    return (tokens[:, None], mask[:, None]) if slots else (tokens, mask)


def test_every_task_equals_its_inference_entry(run, predictor):
    _, model = run
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (12, 20, 3), np.uint8),
              rng.integers(0, 255, (30, 18, 3), np.uint8)]
    canvases = [_canvas(image) for image in images]
    image = np.stack([c[0] for c in canvases]).astype(np.float32)
    valid_wh = np.stack([c[1] for c in canvases])
    np.testing.assert_array_equal(valid_wh, [[32, 19], [19, 32]])
    # Canvas pixels per user pixel.
    scale = valid_wh / np.asarray([[20, 12], [18, 30]], np.float32)
    tokenizer = predictor.tokenizer
    encoder = Encoder(tokenizer=tokenizer, bos_id=tokenizer.pad_id)
    greedy = predictor.settings
    beam = greedy._replace(beam_size=2)
    expressions = ["the dog", "a red car on the left"]
    questions = ["what is it?", "where is the cat?"]
    user_boxes = np.asarray([[2, 1, 15, 10], [0, 5, 18, 30]], np.float32)
    canvas_boxes = (user_boxes.reshape(2, 2, 2) * scale[:, None]).reshape(2, 1, 4)

    @nnx.jit
    def reference(model):
        common = dict(image=image, valid_wh=valid_wh)
        trace = _rows(encoder.context, [tasks.get("trace").eval_prompt] * 2, 1)
        refer = _rows(encoder.context, [f"where is {e}" for e in expressions], 1)
        text = _rows(encoder.text, expressions, 2)
        question = _rows(encoder.context, [tasks.question_prompt(q) for q in questions], 1)
        obj = _rows(encoder.context, ["an object of "] * 2, 1)
        dense = _rows(encoder.context, ["an object of "] * 2, 1, slots=False)
        return {
            "trace": inference.caption_with_traces(
                model, **common, context_tokens=trace[0], context_mask=trace[1],
                settings=greedy),
            "beam": inference.caption_with_traces(
                model, **common, context_tokens=trace[0], context_mask=trace[1],
                settings=beam),
            "refseg": inference.refer_segment(
                model, **common, context_tokens=refer[0], context_mask=refer[1],
                text_tokens=text[0], text_mask=text[1]),
            "answer": inference.caption(model, **common, context_tokens=question[0],
                                        context_mask=question[1], settings=greedy),
            "loca": inference.location_caption(
                model, **common, context_tokens=obj[0], context_mask=obj[1], settings=greedy,
                boxes=jnp.asarray(canvas_boxes)),
            "dense": inference.dense_caption(model, **common, context_tokens=dense[0],
                                             context_mask=dense[1], settings=greedy),
        }

    expected = jax.device_get(reference(model))

    def text_of(tokens, length):
        ids = [int(t) for t in tokens[:length] if t != tokenizer.eos_id]
        return predictor_lib.decode(tokenizer, ids), ids

    for name, found in (("trace", predictor.caption(images)),
                        ("beam", predictor.caption(images, settings=beam))):
        out = expected[name]
        for i, caption in enumerate(found):
            text, ids = text_of(out.tokens[i, 0], out.lengths[i, 0])
            assert caption.text == text
            np.testing.assert_allclose(caption.score, out.log_prob[i, 0], rtol=1e-5)
            user = np.clip(out.token_points[i, 0, :len(ids)] / scale[i], 0, [[20, 12], [18, 30]][i])
            owner = predictor_lib.word_of_each_token(tokenizer, ids)
            for w, word in enumerate(caption.words):
                np.testing.assert_allclose(
                    word.points, user[[t for t, o in enumerate(owner) if o == w]].reshape(-1, 2),
                    atol=1e-4)

    located, segmented = predictor.locate(images, expressions), predictor.segment(images,
                                                                                  expressions)
    out = expected["refseg"]
    for i, (box_only, with_mask) in enumerate(zip(located, segmented)):
        user_box = np.clip((out.boxes[i, 0].reshape(2, 2) / scale[i]).reshape(4), 0,
                           np.tile([[20, 12], [18, 30]][i], 2))
        np.testing.assert_allclose(box_only.box, user_box, atol=1e-4)
        np.testing.assert_allclose(with_mask.box, user_box, atol=1e-4)
        assert box_only.mask is None and with_mask.expression == expressions[i]
        height, width = images[i].shape[:2]
        # The official route: SAM's logits of the image's area, bilinear to the user's size.
        assert with_mask.mask.shape == (height, width) and with_mask.mask.dtype == bool
        np.testing.assert_array_equal(with_mask.mask, mask_logits_to_original(
            out.mask_logits[i, :1], valid_wh=valid_wh[i], canvas=predictor.canvas,
            original_wh=(width, height))[0])
        np.testing.assert_allclose(with_mask.mask_score, out.mask_scores[i, 0], rtol=1e-5)

    for i, answer in enumerate(predictor.answer(images, questions)):
        out = expected["answer"]
        assert answer.text == text_of(out.tokens[i, 0], out.lengths[i, 0])[0]
        np.testing.assert_allclose(answer.score, out.log_prob[i, 0], rtol=1e-5)

    for i, region in enumerate(predictor.describe_region(images, boxes=user_boxes.tolist())):
        out = expected["loca"]
        assert region.text == text_of(out.tokens[i, 0], out.lengths[i, 0])[0]
        np.testing.assert_allclose(region.score, out.log_prob[i, 0], rtol=1e-5)
        np.testing.assert_array_equal(region.box, user_boxes[i])

    out = expected["dense"]
    for i, dense in enumerate(predictor.dense_caption(images)):
        kept = np.flatnonzero(out.valid[i])
        order = kept[np.argsort(-out.scores[i, kept], kind="stable")]
        assert len(dense.regions) == len(order) > 0
        for region, n in zip(dense.regions, order):
            np.testing.assert_allclose(region.score, out.scores[i, n], rtol=1e-5)
            box = np.clip((out.boxes[i, n].reshape(2, 2) / scale[i]).reshape(4), 0,
                          np.tile([[20, 12], [18, 30]][i], 2))
            np.testing.assert_allclose(region.box, box, atol=1e-4)
            captions = out.captions
            assert region.text == text_of(captions.tokens[i, n], captions.lengths[i, n])[0]


def test_coordinates_round_trip_on_a_non_square_image():
    image = np.random.default_rng(0).integers(0, 255, (20, 50, 3), np.uint8)
    canvas_image, frame = predictor_lib.place_on_canvas(image, 32)
    expected_image, valid_wh = _canvas(image)
    np.testing.assert_array_equal(canvas_image, expected_image)
    assert frame.valid_wh == tuple(valid_wh.astype(int)) == (32, 13)
    box = np.asarray([5.0, 2.5, 40.0, 20.0])
    on_canvas = frame.boxes_to_canvas(box)
    np.testing.assert_allclose(on_canvas, [5 * 32 / 50, 2.5 * 13 / 20, 40 * 32 / 50, 13.0],
                               rtol=1e-6)
    np.testing.assert_allclose(frame.boxes_from_canvas(on_canvas), box, rtol=1e-6)
    points = np.asarray([[0.0, 0.0], [49.5, 19.5], [50.0, 20.0]])
    np.testing.assert_allclose(frame.points_from_canvas(frame.points_to_canvas(points)), points,
                               rtol=1e-6)
    # A point the model puts on the padding comes back clipped to the image.
    np.testing.assert_allclose(frame.points_from_canvas([[31.0, 30.0]]), [[31 * 50 / 32, 20]])


def test_another_image_size_in_the_bucket_does_not_recompile(predictor):
    rng = np.random.default_rng(1)
    predictor.locate([rng.integers(0, 255, (16, 24, 3), np.uint8)] * 2, ["the dog", "a cat"])
    traces = dict(predictor.traces)
    # The same expressions (in another order): their token lengths, hence the length buckets,
    # stay; only the images' sizes change.
    located = predictor.locate([rng.integers(0, 255, (40, 9, 3), np.uint8),
                                rng.integers(0, 255, (7, 33, 3), np.uint8)],
                               ["a cat", "the dog"])
    assert dict(predictor.traces) == traces
    assert [r.expression for r in located] == ["a cat", "the dog"]
    # Three images run as a batch of four: one new trace, outputs for the three only.
    three = predictor.locate([rng.integers(0, 255, (9, 9, 3), np.uint8)] * 3,
                             ["the dog", "a cat", "the dog"])
    assert len(three) == 3
    assert predictor.traces["refer"] == traces["refer"] + 1


def test_words_follow_the_training_alignment(predictor):
    tokenizer = predictor.tokenizer
    for text in CAPTIONS:
        ids, words = tokenizer.encode_with_alignment(text)
        assert predictor_lib.word_of_each_token(tokenizer, ids) == words


@pytest.mark.parametrize("call, message", [
    (lambda p, image: p.locate([image], ["  "]), "expression 0: empty text"),
    (lambda p, image: p.describe_region([image], boxes=[[0, 0, 30, 5]]),
     r"box 0: box \[0.0, 0.0, 30.0, 5.0\] is not inside the 20x10 image"),
    (lambda p, image: p.describe_region([image], points=[[[3, 11]]]),
     "points 0: .* not inside the 20x10 image"),
    (lambda p, image: p.answer([image], ["a", "b"]), "questions: 2 given for 1 images"),
    (lambda p, image: p.caption([image.astype(np.float32)]), "uint8 RGB"),
])
def test_bad_input_is_named(predictor, call, message):
    with pytest.raises(ValueError, match=message):
        call(predictor, np.zeros((10, 20, 3), np.uint8))


def test_results_are_json_serialisable(predictor):
    image = np.random.default_rng(2).integers(0, 255, (10, 14, 3), np.uint8)
    # The equality test's batch and text buckets: no new compilation.
    located = predictor.segment([image, image], ["the dog", "a red car on the left"])[0]
    record = json.loads(json.dumps(located.to_json()))
    assert set(record) == {"expression", "box", "mask", "mask_score"}
    from pycocotools import mask as mask_util
    rle = {"size": record["mask"]["size"], "counts": record["mask"]["counts"].encode()}
    np.testing.assert_array_equal(mask_util.decode(rle).astype(bool), located.mask)
