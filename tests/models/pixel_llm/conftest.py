"""Fixtures for the model tests: tiny configs and batches that follow the batch contract."""

import numpy as np
import pytest
from configs import pixelllm as pixelllm_config
from flax import nnx

from pixelllm import batch as batch_lib
from pixelllm import tasks as task_table
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM


def synthetic_batch(seed: int, *, batch: int = 2, slots: int = 2, canvas: int = 32,
                    vocab: int = 128, context_length: int = 4, text_length: int = 6,
                    num_points: int = 2, objects: int = 3, eos_id: int = 1,
                    tasks=("trace", "refseg")) -> dict[str, np.ndarray]:
    """One rectangle per image on noise; every slot talks about it.

    ``tasks[i % len(tasks)]`` (names of :data:`pixelllm.tasks.TASKS`) sets image i's loss masks
    from its row: e.g. "trace" (text + points), "refseg" (text + box + mask), "densecap"
    (proposals; its slots are rebuilt from proposals by the model).
    """
    rng = np.random.default_rng(seed)
    b, s, length = batch, slots, text_length
    image = rng.uniform(0, 60, (b, canvas, canvas, 3)).astype(np.float32)
    valid_wh = np.zeros((b, 2), np.float32)
    boxes = np.zeros((b, 4), np.float32)
    masks = np.zeros((b, canvas, canvas), bool)
    for i in range(b):
        w, h = (canvas, canvas - 8 * (i % 2))
        valid_wh[i] = (w, h)
        image[i, h:] = 0.0
        x0, y0 = rng.integers(2, w // 2 - 2), rng.integers(2, h // 2 - 2)
        x1, y1 = x0 + rng.integers(6, w // 2), y0 + rng.integers(6, h // 2)
        boxes[i] = (x0, y0, x1, y1)
        image[i, y0:y1, x0:x1] = (230.0, 40.0 + 100 * (i % 2), 20.0)
        masks[i, y0:y1, x0:x1] = True

    words = length - 2
    text_tokens = np.zeros((b, s, length), np.int32)
    text_tokens[..., 0] = 0
    text_tokens[..., 1:1 + words] = rng.integers(2, vocab, (b, s, words))
    text_tokens[..., 1 + words] = eos_id
    text_mask = np.ones((b, s, length), bool)
    context_tokens = rng.integers(2, vocab, (b, s, context_length)).astype(np.int32)
    context_tokens[..., -1] = eos_id
    context_mask = np.ones((b, s, context_length), bool)
    context_mask[:, :, 1] = False  # padding inside the prefix must not matter

    token_points = np.zeros((b, s, length, num_points, 2), np.float32)
    points_mask = np.zeros((b, s, length), bool)
    points_mask[..., 1:1 + words] = True
    for i in range(b):
        x0, y0, x1, y1 = boxes[i]
        for j in range(words):  # each word covers a horizontal strip of the box
            top = y0 + (y1 - y0) * j / words
            bottom = y0 + (y1 - y0) * (j + 1) / words
            token_points[i, :, 1 + j] = [[x0, top], [x1, bottom]][:num_points]

    # The loss masks follow each task's row of the task table.
    loss_masks = {key: np.zeros((b,) if key == batch_lib.TASK_PROPOSALS else (b, s), np.float32)
                  for key in batch_lib.LOSS_MASKS.values()}
    for i in range(b):
        for loss in task_table.get(tasks[i % len(tasks)]).losses:
            loss_masks[batch_lib.LOSS_MASKS[loss]][i] = 1.0

    gt_boxes = np.zeros((b, objects, 4), np.float32)
    gt_boxes[:, 0] = boxes
    gt_mask = np.zeros((b, objects), bool)
    gt_mask[:, 0] = True
    return {
        "image": image, "valid_wh": valid_wh,
        "prompt_boxes": np.concatenate([np.zeros((b, 2), np.float32), valid_wh], -1)[:, None]
        .repeat(s, 1),
        "context_tokens": context_tokens, "context_mask": context_mask,
        "text_tokens": text_tokens, "text_mask": text_mask,
        "token_points": token_points, "token_points_mask": points_mask,
        "target_boxes": np.repeat(boxes[:, None], s, 1),
        "target_masks": np.repeat(masks[:, None], s, 1),
        "slot_mask": np.ones((b, s), bool),
        **loss_masks,
        "gt_boxes": gt_boxes, "gt_mask": gt_mask,
        "gt_text_tokens": np.repeat(text_tokens[:, :1], objects, 1),
        "gt_text_mask": np.repeat(text_mask[:, :1], objects, 1) & gt_mask[..., None],
    }


@pytest.fixture(scope="session")
def make_batch():
    return synthetic_batch


def tiny_config(variant: str = "tiny"):
    return pixelllm_config.get_config(variant)


@pytest.fixture(scope="session")
def tiny_t5_config():
    return tiny_config("tiny")


@pytest.fixture(scope="session")
def tiny_decoder_config():
    return tiny_config("tiny_decoder")


@pytest.fixture(scope="session")
def build_model():
    def build(config, seed: int = 0, **overrides):
        return PixelLLM.from_config(config.model, rngs=nnx.Rngs(seed), **overrides)
    return build
