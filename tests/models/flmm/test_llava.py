"""LLaVA-1.5 against transformers' LlavaForConditionalGeneration at tiny random sizes (eager
attention): the caption positions' logits, every layer's attention probabilities and the hidden
states F-LMM reads (``hidden_states[-layers:]``, in its head's layout, from the same forward as
the attention maps), with one caption right-padded in our batch; the loader under both
transformers layouts and its strictness; F-LMM's image preprocessing; the full-size parameter
count."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image
from transformers import image_transforms
from transformers.initialization import no_init_weights

from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.encoders import clip
from pixelllm.models.flmm import attention_maps, llava

IMAGE, BOS = 47, 1
PROMPT = [BOS, 5, 6, IMAGE, 13, 7, 8, 9, 10]          # <s> USER: <image> \n ... ASSISTANT:
CAPTIONS = [[20, 21, 22, 23, 24, 25], [30, 31, 32, 33]]
MAX_CAPTION = 6
GRID = 4                                               # 28 px, patch 7


def hf_config():
    vision = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        image_size=28, patch_size=7)
    text = transformers.LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=8, rms_norm_eps=1e-5,
        max_position_embeddings=128, tie_word_embeddings=False)
    return transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=GRID * GRID,
        attn_implementation="eager")


@functools.lru_cache(maxsize=None)
def tiny_reference():
    """(transformers model, its state dict as numpy, our loaded model, pixels NHWC)."""
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(hf_config())
    with torch.no_grad():
        for p in hf.parameters():
            # Larger than the default init, so attention is far from uniform.
            p.copy_(1.0 + 0.3 * torch.randn(p.shape) if p.ndim == 1
                    else torch.randn(p.shape) / math.sqrt(np.prod(p.shape[1:])))
    hf.eval()
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    config = llava.config_from_hf(hf.config.to_dict(), source="tiny config")
    assert config["image_token_index"] == IMAGE
    ours = llava.load(llava.build(config, rngs=nnx.Rngs(1)), state, source="tiny llava")
    pixels = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
    return hf, state, ours, pixels


def our_inputs(pixels):
    return llava.pack_inputs(pixels, llava.split_prompt(PROMPT, image_token_id=IMAGE), CAPTIONS,
                             max_caption_tokens=MAX_CAPTION)


def hf_forward(hf, pixels, index):
    """transformers on image ``index`` alone: the prompt with <image> expanded, then the caption."""
    split = PROMPT.index(IMAGE)
    ids = PROMPT[:split] + [IMAGE] * GRID * GRID + PROMPT[split + 1:] + CAPTIONS[index]
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]),
                  pixel_values=torch.from_numpy(pixels[index:index + 1]).permute(0, 3, 1, 2),
                  output_attentions=True, output_hidden_states=True)


def test_split_prompt():
    pieces = llava.split_prompt(PROMPT, image_token_id=IMAGE)
    assert pieces == llava.PromptPieces(before=[BOS, 5, 6], after=[13, 7, 8, 9], last=10)
    with pytest.raises(ValueError, match="2 image tokens"):
        llava.split_prompt([BOS, IMAGE, IMAGE, 5], image_token_id=IMAGE)


def test_logits_attention_and_hidden_states_match_transformers():
    hf, _, ours, pixels = tiny_reference()
    inputs = our_inputs(pixels)
    layers = hf.config.text_config.num_hidden_layers
    assert ours.flmm_hidden_layers == range(1, layers + 1)
    out = jax.jit(lambda m, x: m(x, attention_layers=range(layers),
                                 hidden_layers=m.flmm_hidden_layers))(ours, inputs)
    states = llava.stack_hidden_states(out.hidden_states)
    assert states.shape == (2, 1 + MAX_CAPTION, layers, 32)   # [N, L, layers, D]
    start, stop = ours.image_columns(inputs)
    prompt_length = len(PROMPT) - 1 + GRID * GRID - 1   # everything before the last prompt token
    assert (start, stop) == (3, 3 + GRID * GRID)
    for i, caption in enumerate(CAPTIONS):
        ref = hf_forward(hf, pixels, i)
        n = 1 + len(caption)                             # last prompt token + caption
        rows = slice(prompt_length, prompt_length + n)
        np.testing.assert_allclose(out.logits[i, :n], ref.logits[0, rows].numpy(), atol=1e-4,
                                   rtol=1e-4)
        for layer in range(layers):
            probs = np.asarray(out.attention[layer][i])
            expected = ref.attentions[layer][0, :, rows].numpy()
            # The image columns, then every valid key (the padded caption's keys get 0).
            np.testing.assert_allclose(probs[:, :n, start:stop], expected[..., start:stop],
                                       atol=1e-5)
            np.testing.assert_allclose(probs[:, :n, :prompt_length + n], expected, atol=1e-5)
            assert np.all(probs[:, :n, prompt_length + n:] == 0)
        # F-LMM's hidden_states[-layers:]: every block's output, the last after the final norm.
        for j, reference in enumerate(ref.hidden_states[-layers:]):
            np.testing.assert_allclose(states[i, :n, j], reference[0, rows].numpy(), atol=1e-5,
                                       rtol=1e-5)


def test_grounding_gives_flmm_head_text_states_from_the_same_forward():
    hf, _, ours, pixels = tiny_reference()
    inputs = our_inputs(pixels)
    # Image 0: phrases over caption tokens [0, 2) and [3, 6); image 1: [1, 4) and a padding slot.
    spans = jnp.asarray([[[0, 2], [3, 6]], [[1, 4], [0, 0]]])
    valid = jnp.asarray([[True, True], [True, False]])
    grounding = jax.jit(lambda m, x: attention_maps.llava_grounding(
        m, x, caption_spans=spans, valid=valid, max_tokens=3))(ours, inputs)
    layers = hf.config.text_config.num_hidden_layers
    assert grounding.maps.shape == (2, 2, layers * 4, GRID, GRID)
    # FlmmHeadInputs.text_hidden [B, P, T, L, D] and text_valid [B, P, T].
    assert grounding.text_hidden.shape == (2, 2, 3, layers, 32)
    np.testing.assert_array_equal(grounding.text_valid, [[[1, 1, 0], [1, 1, 1]],
                                                         [[1, 1, 1], [0, 0, 0]]])
    first_caption_row = len(PROMPT) - 1 + GRID * GRID   # transformers' row of caption token 0
    for i in range(2):
        ref = hf_forward(hf, pixels, i)
        expected = torch.stack([h[0] for h in ref.hidden_states[-layers:]], dim=1).numpy()
        for phrase in range(int(valid[i].sum())):
            start, end = (int(v) for v in spans[i, phrase])
            np.testing.assert_allclose(grounding.text_hidden[i, phrase, :end - start],
                                       expected[first_caption_row + start:first_caption_row + end],
                                       atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(grounding.text_hidden)[~np.asarray(grounding.text_valid)] == 0)


def test_image_tokens_match_transformers():
    hf, _, ours, pixels = tiny_reference()
    with torch.no_grad():
        expected = hf.model.get_image_features(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    # transformers 5.x returns the vision output with the projected features per image.
    expected = torch.stack(list(expected.pooler_output)).numpy()
    np.testing.assert_allclose(ours.image_tokens(jnp.asarray(pixels)), expected, atol=1e-4,
                               rtol=1e-4)


def rename_to_4x(state):
    """The same weights under transformers 4.x's names (the layout of the released files)."""
    renames = (("model.vision_tower.", "vision_tower.vision_model."),
               ("model.multi_modal_projector.", "multi_modal_projector."),
               ("model.language_model.", "language_model.model."),
               ("lm_head.", "language_model.lm_head."))
    out = {}
    for key, value in state.items():
        old, new = next((o, n) for o, n in renames if key.startswith(o))
        out[new + key[len(old):]] = value
    return out


def fresh_model():
    _, _, ours, _ = tiny_reference()
    return nnx.eval_shape(lambda: llava.Llava(
        vision_tower=clip.ClipVision(width=16, depth=3, heads=2, mlp_dim=32, patch_size=7,
                                     image_size=28, rngs=nnx.Rngs(0)),
        language_model=type(ours.language_model)(ours.language_model.config, rngs=nnx.Rngs(0)),
        rngs=nnx.Rngs(0)))


def test_loads_the_4x_layout_to_the_same_weights():
    _, state, ours, _ = tiny_reference()
    loaded = llava.load(fresh_model(), rename_to_4x(state), source="llava 4.x")
    expected, got = nnx.state(ours), nnx.state(loaded)
    for (path, a), (_, b) in zip(nnx.to_flat_state(expected), nnx.to_flat_state(got)):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


def test_load_llava_reads_a_save_pretrained_folder(tmp_path):
    # config.json builds the model; the safetensors file fills it.
    hf, _, ours, _ = tiny_reference()
    hf.save_pretrained(tmp_path)
    loaded = llava.load_llava(tmp_path)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(ours)),
                                 nnx.to_flat_state(nnx.state(loaded))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


def test_loader_is_strict_and_names_file_and_key():
    _, state, _, _ = tiny_reference()
    extra = dict(state, **{"model.multi_modal_projector.linear_3.weight": np.zeros((2, 2))})
    with pytest.raises(CheckpointMismatchError, match=r"llava\.bin.*\n.*unexpected keys: "
                                                      r"model\.multi_modal_projector\.linear_3"):
        llava.load(fresh_model(), extra, source="llava.bin")
    missing = {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(CheckpointMismatchError,
                       match=r"missing keys: model\.language_model\.layers\.1\.mlp\.up_proj"):
        llava.load(fresh_model(), missing, source="llava.bin")
    no_tower = {k: v for k, v in state.items() if "vision_tower" not in k}
    with pytest.raises(CheckpointMismatchError, match="llava.bin: not a LLaVA checkpoint"):
        llava.load(fresh_model(), no_tower, source="llava.bin")


@pytest.mark.parametrize("hw", [(20, 10), (9, 25), (16, 16)])
def test_preprocess_pads_the_resized_image_with_the_mean_colour(hw):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    pixels, geometry = llava.preprocess(image, image_size=28)
    # F-LMM: the longest side to 28, the other int(side * 28 / longest); centred padding.
    resized = (28, int(hw[1] * 28 / hw[0])) if hw[0] > hw[1] else (int(hw[0] * 28 / hw[1]), 28)
    top, left = (28 - resized[0]) // 2, (28 - resized[1]) // 2
    assert geometry == llava.PadGeometry(original_hw=hw, image_hw=resized, pad_before=(top, left),
                                         padded_size=(28, 28))
    assert llava.PAD_COLOUR == (122, 116, 104)
    expected = np.empty((28, 28, 3), np.uint8)
    expected[:] = llava.PAD_COLOUR
    expected[top:top + resized[0], left:left + resized[1]] = np.asarray(
        Image.fromarray(image).resize(resized[::-1], Image.BICUBIC))
    # CLIPImageProcessor's rescale and normalize (its numpy functions; the class itself needs
    # torchvision in transformers 5.x).
    reference = image_transforms.normalize(image_transforms.rescale(expected, 1 / 255),
                                           clip.PIXEL_MEAN, clip.PIXEL_STD)
    np.testing.assert_allclose(pixels, reference, atol=1e-6)


def parameter_count(vision_depth, text_layers):
    config = llava.NAMED_CONFIGS["llava_1_5_7b"]
    config = dict(vision=dict(config["vision"], depth=vision_depth),
                  language_model=dict(config["language_model"], num_layers=text_layers))
    model = nnx.eval_shape(lambda: llava.build(config, rngs=nnx.Rngs(0)))
    return sum(math.prod(v.get_value().shape)
               for _, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState))))


def test_llava_1_5_7b_parameter_count_matches_transformers():
    # Every layer of a tower has the same parameters, so the full size follows from one- and
    # two-layer builds at full width (a 56-layer eval_shape costs tens of seconds here).
    base = parameter_count(1, 1)
    per_vision_layer, per_text_layer = parameter_count(2, 1) - base, parameter_count(1, 2) - base
    vision_depth = llava.NAMED_CONFIGS["llava_1_5_7b"]["vision"]["depth"]
    text_layers = llava.NAMED_CONFIGS["llava_1_5_7b"]["language_model"]["num_layers"]
    ours = (base + (vision_depth - 1) * per_vision_layer
            + (text_layers - 1) * per_text_layer)
    vision = transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14)
    text = transformers.LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
        max_position_embeddings=4096)
    # On the meta device and without transformers' weight initialization, which would take
    # seconds on tensors that hold nothing.
    with torch.device("meta"), no_init_weights():
        reference = transformers.LlavaForConditionalGeneration(
            transformers.LlavaConfig(vision_config=vision, text_config=text))
    assert ours == sum(p.numel() for p in reference.parameters()) == 7_063_427_072
