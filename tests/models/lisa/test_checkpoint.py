"""LISA's released checkpoint layout end to end: the tiny PyTorch reference of
``test_lisa_parity.py`` (transformers LlamaForCausalLM + segment_anything + LISA's glue), with a
transformers CLIPVisionModel as its vision tower, is saved as LISA's sharded ``.bin`` files plus a
separate CLIP file, loaded through the converter into a freshly built tiny ``Lisa``, and both
compute the same logits, [SEG] embeddings and masks. Then the converter's refusals."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.encoders.clip import ClipVision
from pixelllm.encoders.sam import sam as sam_lib
from pixelllm.language import decoder
from pixelllm.language.tokenizer import Tokenizer
from pixelllm.models.lisa import checkpoint
from pixelllm.models.lisa import lisa as lisa_lib
from pixelllm.nn.lora import LoRASettings
from tests.models.lisa import test_lisa_parity as parity


def hf_clip():
    """A tiny CLIPVisionModel with LLaVA's 16 patch tokens of width 24 at 16 px."""
    config = transformers.CLIPVisionConfig(
        hidden_size=parity.VISION_WIDTH, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=2, patch_size=parity.PATCH, image_size=parity.CLIP_SIZE,
        hidden_act="quick_gelu", attn_implementation="eager")
    return transformers.CLIPVisionModel(config).eval()


def fresh_lisa():
    """The tiny LISA of the parity test with a real CLIP tower, random weights."""
    lm = decoder.DecoderLM(decoder.DecoderConfig(
        vocab_size=parity.BASE_VOCAB, hidden_size=parity.WIDTH, intermediate_size=64,
        num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, norm_eps=1e-6,
        lora=LoRASettings(rank=4, alpha=8.0, targets=("q", "v"))), rngs=nnx.Rngs(5))
    assert lm.add_token_rows(1) == parity.SEG
    tower = ClipVision(width=parity.VISION_WIDTH, depth=3, heads=2, mlp_dim=48,
                       patch_size=parity.PATCH, image_size=parity.CLIP_SIZE, rngs=nnx.Rngs(6))
    return lisa_lib.Lisa(vision_tower=tower, vision_width=parity.VISION_WIDTH, language_model=lm,
                         sam=sam_lib.Sam(**parity.SAM.to_dict(), rngs=nnx.Rngs(7)),
                         seg_token_id=parity.SEG, rngs=nnx.Rngs(8))


def lisa_state_dict(hf, sam, projector, fcs):
    """LISA's merged HF file layout (merge_lora_weights_and_save_hf_model.py)."""
    state = {k: v for k, v in hf.state_dict().items()}
    state.update({f"model.visual_model.{k}": v for k, v in sam.state_dict().items()})
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    state.update({f"model.text_hidden_fcs.0.{k}": v for k, v in fcs.state_dict().items()})
    # A RoPE buffer transformers 4.2x wrote, which the converter ignores.
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def save_sharded(state, folder, shards=2):
    """pytorch_model-0000x-of-0000y.bin + pytorch_model.bin.index.json, as save_pretrained."""
    folder.mkdir()
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    hf, sam_torch, clip_torch = parity.torch_llama(), parity.torch_sam(), hf_clip()
    projector = torch.nn.Linear(parity.VISION_WIDTH, parity.WIDTH)
    fcs = torch.nn.Sequential(torch.nn.Linear(parity.WIDTH, parity.WIDTH), torch.nn.ReLU(),
                              torch.nn.Linear(parity.WIDTH, parity.SAM.prompt_encoder.embed_dim))
    return hf, sam_torch, clip_torch, projector, fcs


def test_released_layout_loads_and_matches_the_reference(reference, tmp_path, monkeypatch):
    hf, sam_torch, clip_torch, projector, fcs = reference
    save_sharded(lisa_state_dict(hf, sam_torch, projector, fcs), tmp_path / "LISA-7B-v1")
    torch.save({k: v.contiguous() for k, v in clip_torch.state_dict().items()},
               tmp_path / "clip.bin")
    model = fresh_lisa()
    # Adapters with values: the converter must zero them (the file's weights are merged).
    for _, module in nnx.iter_modules(model):
        if getattr(module, "lora_b", None) is not None:
            module.lora_b.set_value(jnp.ones_like(module.lora_b.get_value()))
    checkpoint.load_pretrained(model, lisa=tmp_path / "LISA-7B-v1", clip=tmp_path / "clip.bin")

    # The reference's tower: LLaVA's CLIP features (second-to-last layer, CLS dropped), entered
    # through the parity reference's linear stand-in with an identity weight.
    def clip_features(pixels):
        with torch.no_grad():
            out = clip_torch(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                             output_hidden_states=True)
        return out.hidden_states[-2][:, 1:].numpy()

    monkeypatch.setattr(parity, "patchify", clip_features)
    rng = np.random.default_rng(1)
    clip_pixels = rng.normal(size=(2, parity.CLIP_SIZE, parity.CLIP_SIZE, 3)).astype(np.float32)
    sam_pixels = rng.normal(size=(2, 40, 40, 3)).astype(np.float32)
    gt = [torch.zeros(3, *parity.ORIGINAL_HW[0]), torch.zeros(1, *parity.ORIGINAL_HW[1])]
    expected = parity.torch_reference(
        hf, sam_torch, torch.eye(parity.VISION_WIDTH), torch.zeros(parity.VISION_WIDTH),
        projector, fcs, clip_pixels, sam_pixels, gt)

    inputs, _ = parity.our_inputs(clip_pixels, sam_pixels)
    out = nnx.jit(lambda m, x: m(x, max_masks=parity.MAX_MASKS, mask_hw=parity.MASK_HW))(
        model, inputs)
    for row, ((image, question, answer), c) in enumerate(zip(parity.CONVERSATIONS, (0, 1, 0))):
        start = len(parity.prompt_ids(question)) - 1 + parity.TOKENS - 1
        ref = expected["logits"][row, start:start + len(answer) + 1]
        np.testing.assert_allclose(out.logits[image, c, :len(answer) + 1], ref, atol=1e-4)
    ours_embeddings = np.asarray(out.seg_embeddings)[np.asarray(out.mask_valid)]
    np.testing.assert_allclose(ours_embeddings, expected["embeddings"], atol=1e-4)
    for i, (h, w) in enumerate(parity.ORIGINAL_HW):
        count = len(expected["masks"][i])
        np.testing.assert_allclose(np.asarray(out.masks[i, :count, :h, :w]),
                                   expected["masks"][i], atol=1e-4)
    assert np.abs(expected["masks"][0]).max() > 0.1


@pytest.fixture(scope="module")
def state(reference):
    hf, sam_torch, clip_torch, projector, fcs = reference
    lisa = {k: v.numpy() for k, v in lisa_state_dict(hf, sam_torch, projector, fcs).items()}
    clip = {k: v.detach().numpy() for k, v in clip_torch.state_dict().items()}
    return lisa, clip


@pytest.fixture(scope="module")
def abstract_model():
    return nnx.eval_shape(fresh_lisa)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("model.text_hidden_fcs.0.2.bias"),
     r"(?s)lisa\.bin: .*missing keys: model\.text_hidden_fcs\.0\.2\.bias"),
    (lambda s: s.update({"model.mm_projector.weight": s["model.mm_projector.weight"].T}),
     r"(?s)lisa\.bin: .*mis-shaped keys: model\.mm_projector\.weight"),
    (lambda s: s.update({"model.extra_head.weight": np.zeros(3)}),
     r"lisa\.bin: keys that are not part of LISA's checkpoint layout: model\.extra_head\.weight"),
    (lambda s: s.update({"lm_head.weight": s["lm_head.weight"][:-1]}),
     r"lisa\.bin: lm_head\.weight has shape \(63, 32\); the model has 63 vocabulary rows \+ 1 "
     r"added token rows = 64"),
    (lambda s: s.pop("model.visual_model.mask_decoder.iou_token.weight"),
     r"(?s)lisa\.bin \(keys under 'model\.visual_model\.'\): .*missing keys: "
     r"mask_decoder\.iou_token\.weight"),
    (lambda s: s.pop("model.layers.1.self_attn.q_proj.weight"),
     r"(?s)lisa\.bin: .*missing keys: model\.layers\.1\.self_attn\.q_proj\.weight"),
])
def test_mismatches_name_the_file_and_key(state, abstract_model, edit, message):
    lisa, clip = dict(state[0]), state[1]
    edit(lisa)
    with pytest.raises(CheckpointMismatchError, match=message):
        checkpoint.load(abstract_model, lisa, source="lisa.bin", clip_state_dict=clip)


def test_the_vision_tower_must_come_from_somewhere(state, abstract_model):
    with pytest.raises(CheckpointMismatchError, match=r"lisa\.bin: holds no vision tower keys"):
        checkpoint.load(abstract_model, state[0], source="lisa.bin")


def test_tower_keys_in_the_lisa_file_load_when_no_clip_is_given(state):
    lisa, clip = state
    tower = {f"model.vision_tower.vision_tower.{k}": v for k, v in clip.items()}
    model = checkpoint.load(fresh_lisa(), {**lisa, **tower}, source="lisa.bin")
    np.testing.assert_array_equal(model.vision_tower.position_embedding.get_value(),
                                  next(v for k, v in clip.items()
                                       if k.endswith("position_embedding.weight")))


class _Pieces(Tokenizer):
    """A tokenizer that encodes text as given ids, the prefix piece ``▁`` decoding to a space."""

    def __init__(self, ids):
        super().__init__(path="tokenizer.model", vocab_size=40000, bos_id=1, eos_id=2, pad_id=0)
        self.ids = ids

    def _encode(self, text):
        return list(self.ids)

    def _encode_with_offsets(self, text):
        raise NotImplementedError

    def _decode(self, ids):
        return "".join(" " if i == 29871 else "[SEG]" if i == 32003 else "x" for i in ids)


@pytest.mark.parametrize("ids, ok", [
    ([32003], True), ([29871, 32003], True), ([32002], False), ([518, 1660, 29954, 29962], False)])
def test_seg_token_id_is_checked_against_the_tokenizer(ids, ok):
    if ok:
        checkpoint.check_seg_token(_Pieces(ids), 32003)
    else:
        with pytest.raises(ValueError, match=r"tokenizer\.model: encodes '\[SEG\]' as"):
            checkpoint.check_seg_token(_Pieces(ids), 32003)
