"""configs/data.py: each stage's batch sizes are the official stage config's (scenic
``projects/pixel_llm/configs/t5/*.py``: ``max_boxes``, ``max_context_tokens``,
``max_text_tokens``), and every op chain of the stage is built with them."""

import pytest
from configs import data as data_config


@pytest.mark.parametrize("variant, slots, context_length, text_length", [
    ("pixelllm", 16, 32, 128),   # pixel_llm_t5_trace_ref_densecap_llava.py
    ("trace", 1, 8, 128),        # pixel_llm_t5_trace.py
    ("ref", 16, 40, 40),         # pixel_llm_t5_ref.py: context -1 = the text length
    ("refseg", 16, 40, 40),      # pixel_llm_t5_refseg.py
    ("densecap", 32, 8, 40),     # pixel_llm_t5_densecap.py: 32 text proposals
])
def test_stage_sizes_are_the_official_ones(variant, slots, context_length, text_length):
    config = data_config.get_config(variant)
    sizes = config.sizes
    assert (sizes["slots"], sizes["context_length"], sizes["text_length"]) == (
        slots, context_length, text_length)
    assert (sizes["canvas"], sizes["points_per_token"], sizes["objects"]) == (384, 2, 100)
    for entry in config.train:
        ops = {op["op"]: op for op in entry["ops"]}
        assert ops["slot"]["slots"] == slots, entry["name"]
        assert (ops["tokenize"]["context_length"], ops["tokenize"]["text_length"]) == (
            context_length, text_length), entry["name"]
    for entry in config.eval:   # evaluation keeps the lengths (its slot counts are its own)
        tokenize = next(op for op in entry["ops"] if op["op"] == "tokenize")
        assert (tokenize["context_length"], tokenize["text_length"]) == (
            context_length, text_length), entry["name"]
