"""configs/lisa.py: LISA-7B-v1's sizes and parameter counts (built abstractly), the tiny variant
built for real, and the [SEG] id the config states."""

import pytest
from flax import nnx

from configs import lisa as lisa_config
from configs import sam as sam_config
from pixelllm.encoders import clip
from pixelllm.models.lisa import checkpoint

# Published component counts (torch parameters; checked on the meta device with transformers
# LlamaForCausalLM / CLIPVisionModel and segment_anything's ViT-H modules):
LLAMA_7B = 6_738_415_616              # vocabulary 32000, untied
ADDED_ROWS = 4 * 4096 * 2             # <im_patch> <im_start> <im_end> [SEG]: embedding + head
CLIP_L14_224 = 303_179_776            # CLIPVisionModel, post_layernorm included
PROJECTOR = 1024 * 4096 + 4096
SAM_VIT_H = 641_090_608 + 2 * 128     # + the prompt encoder's Gaussian PE matrix (a buffer there)
TEXT_HIDDEN_FCS = (4096 * 4096 + 4096) + (4096 * 256 + 256)
LORA = 32 * 2 * (4096 * 8 + 8 * 4096)  # r 8 on q and v of 32 layers
MASK_DECODER = 4_058_340


def test_lisa_7b_counts_are_the_published_ones():
    rows = {name: (trained, frozen) for name, trained, frozen in
            checkpoint.parameter_rows(lisa_config.get_config("lisa_7b"), depth=1)}
    trained, frozen = rows["total"]
    assert trained + frozen == (LLAMA_7B + ADDED_ROWS + CLIP_L14_224 + PROJECTOR + SAM_VIT_H
                                + TEXT_HIDDEN_FCS + LORA) == 7_708_941_872
    # LISA trains LoRA, both token tables whole, text_hidden_fcs and SAM's mask decoder.
    assert trained == (LORA + 2 * 32000 * 4096 + ADDED_ROWS + TEXT_HIDDEN_FCS
                       + MASK_DECODER) == 288_259_556
    assert rows["vision_tower"] == (0, CLIP_L14_224)
    assert rows["mm_projector"] == (0, PROJECTOR)
    assert sum(rows["sam"]) == SAM_VIT_H and rows["sam"][0] == MASK_DECODER


def test_lisa_7b_config_values():
    config = lisa_config.get_config("lisa_7b")
    model = config.model
    assert dict(model.vision_tower) == clip.NAMED_CONFIGS["vit_l14_224"]
    assert model.sam.to_dict() == sam_config.get_config("vit_h").model.to_dict()
    lm = model.language_model
    assert (lm.vocab_size, lm.hidden_size, lm.intermediate_size, lm.num_layers, lm.num_heads,
            lm.num_kv_heads, lm.head_dim) == (32000, 4096, 11008, 32, 32, 32, 128)
    assert (lm.norm_eps, lm.rope_theta, lm.tie_word_embeddings) == (1e-6, 10_000.0, False)
    # train_ds.py: --lora_r 8, --lora_alpha 16, --lora_dropout 0.05, q_proj and v_proj.
    assert (lm.lora.rank, lm.lora.alpha, tuple(lm.lora.targets), lm.lora.dropout) == (
        8, 16.0, ("q", "v"), 0.05)
    ids = {token: 32000 + i for i, token in enumerate(model.added_tokens)}
    assert ids == {"<im_patch>": 32000, "<im_start>": 32001, "<im_end>": 32002, "[SEG]": 32003}
    assert model.seg_token_id == 32003
    assert (config.sizes.clip_image_size, config.sizes.image_tokens,
            config.sizes.sam_image_size) == (224, 256, 1024)


def test_tiny_builds_with_the_added_rows_and_sizes():
    config = lisa_config.get_config("tiny")
    model = checkpoint.build(config.model, rngs=nnx.Rngs(0))
    assert model.seg_token_id == 64 + 3 and model.language_model.vocab_size == 68
    assert model.language_model.added_tokens.embedding.get_value().shape == (4, 32)
    tower = model.vision_tower
    assert (tower.image_size, tower.grid ** 2) == (config.sizes.clip_image_size,
                                                   config.sizes.image_tokens)
    assert model.sam.prompt_encoder.input_image_size[0] == config.sizes.sam_image_size
    assert model.mm_projector.kernel.get_value().shape == (16, 32)


def test_a_seg_id_the_added_tokens_do_not_give_is_refused():
    config = lisa_config.get_config("tiny")
    config.model.seg_token_id = 66
    with pytest.raises(ValueError, match=r"seg_token_id=66.*id 67"):
        checkpoint.build(config.model, rngs=nnx.Rngs(0))
