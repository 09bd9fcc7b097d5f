"""A model built without a mask adapter or a proposal head (``config.model.<module>`` None, as the
training stages whose official counterpart builds none, ``configs/stages.py``) refuses the tasks
that need them with an error naming the config field, before any computation."""

import numpy as np
import pytest
from configs import stages

from pixelllm import tasks
from pixelllm.models.pixel_llm import inference
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.nn import abstract


def _model(stage: str) -> PixelLLM:
    config = stages.get_config(stage).model
    return abstract.build_abstract(lambda rngs: PixelLLM.from_config(config, rngs=rngs))


@pytest.mark.parametrize("stage, missing", [
    ("trace_tiny", {"refseg": ("mask_adapter",), "densecap": ("proposal_head",)}),
    ("refseg_tiny", {"densecap": ("proposal_head",)}),
    ("densecap_tiny", {"refseg": ("mask_adapter",)}),
    ("multitask_refseg_tiny", {}),
])
def test_missing_modules_from_the_model_and_from_its_config_agree(stage, missing):
    model, config = _model(stage), stages.get_config(stage).model
    for source in (model, config):
        found = {task: inference.missing_modules(source, task) for task in tasks.TASKS}
        assert {task: modules for task, modules in found.items() if modules} == missing


def test_segmenting_and_dense_captioning_are_refused_naming_the_config_field():
    model = _model("trace_tiny")
    image, valid_wh = np.zeros((1, 32, 32, 3), np.float32), np.full((1, 2), 32.0, np.float32)
    tokens, mask = np.zeros((1, 1, 8), np.int32), np.ones((1, 1, 8), bool)
    with pytest.raises(ValueError, match=r"task 'refseg' cannot run on this model: "
                                         r"config\.model\.mask_adapter is None"):
        inference.refer_segment(model, image, valid_wh, context_tokens=tokens,
                                context_mask=mask, text_tokens=tokens, text_mask=mask)
    settings = inference.DecodeSettings(bos_id=0, eos_id=1, pad_id=0, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"task 'densecap' cannot run on this model: "
                                         r"config\.model\.proposal_head is None"):
        inference.dense_caption(model, image, valid_wh, context_tokens=tokens[:, 0],
                                context_mask=mask[:, 0], settings=settings)
