"""Public checkpoints of the reference implementations (segment_anything, timm, transformers) at
tiny random sizes load into PixelLLM's parts exactly as into the standalone models."""

import json
import re
import types

import numpy as np
import pytest
import safetensors.numpy
import torch
from configs import pixelllm as pixelllm_config
from flax import nnx
from timm.models.eva import Eva
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.encoders import eva02
from pixelllm.encoders.sam import sam
from pixelllm.language import decoder, t5
from pixelllm.models.pixel_llm.pixel_llm import PixelLLM
from pixelllm.models.pixel_llm.pretrained import load_pretrained
from pixelllm.nn import abstract
from tests import segment_anything_reference


def _randomized(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def _numpy(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _sam_state(config):
    return _numpy(segment_anything_reference.torch_sam(
        config.sam, img_size=config.sam.image_encoder.pretrain_img_size, seed=1))


def _eva02_state(config):
    e = config.eva02
    return _numpy(_randomized(Eva(
        img_size=e.img_size, patch_size=e.patch_size, embed_dim=e.embed_dim, depth=e.depth,
        num_heads=e.num_heads, mlp_ratio=e.mlp_ratio, qkv_fused=False, swiglu_mlp=True,
        scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(e.rope_ref_grid,) * 2,
        global_pool="avg", num_classes=0), seed=2))


def _t5_folder(config, folder):
    m = config.language_model.model
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.d_kv, d_ff=m.d_ff,
        num_layers=m.num_layers, num_decoder_layers=m.num_decoder_layers, num_heads=m.num_heads,
        feed_forward_proj=m.feed_forward_proj, tie_word_embeddings=True))
    state = _numpy(_randomized(model, seed=3))
    # Flan-T5 files carry their own lm_head (untied); write one as they do.
    state["lm_head.weight"] = np.random.default_rng(3).normal(
        size=state["shared.weight"].shape).astype(np.float32)
    safetensors.numpy.save_file(state, str(folder / "model.safetensors"))
    return folder


def _flat(module):
    return {path: np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState)))}


def test_public_checkpoints_fill_the_parts_as_the_standalone_loaders(tmp_path):
    config = pixelllm_config.get_config("tiny").model
    model = PixelLLM.from_config(config, rngs=nnx.Rngs(0))
    adapter_before = _flat(model.prompt_adapter)
    lora_before = {p: v for p, v in _flat(model.lm).items() if "lora" in "/".join(map(str, p))}
    sam_state, eva_state = _sam_state(config), _eva02_state(config)
    folder = _t5_folder(config, tmp_path)

    load_pretrained(model, sam=sam_state, eva02=eva_state, language_model=folder)

    standalone_sam = sam.load_sam(sam_state, config=config.sam, img_size=config.canvas_size)
    standalone_eva = eva02.load(eva02.Eva02(**config.eva02.to_dict(), rngs=nnx.Rngs(5)),
                                eva_state, source="eva02")
    standalone_t5 = t5.T5(config.language_model.model, rngs=nnx.Rngs(6))
    t5.load(standalone_t5, safetensors.numpy.load_file(
        str(folder / "model.safetensors")), source="t5")
    for part, standalone in ((model.sam, standalone_sam), (model.eva02, standalone_eva)):
        got, want = _flat(part), _flat(standalone)
        assert got.keys() == want.keys()
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
    got, want = _flat(model.lm), _flat(standalone_t5)
    for path, value in want.items():
        if "lora" not in "/".join(map(str, path)):
            np.testing.assert_array_equal(got[path], value, err_msg=str(path))
    # PixelLLM's own modules and the LoRA adapters keep their values.
    for path, value in _flat(model.prompt_adapter).items():
        np.testing.assert_array_equal(value, adapter_before[path])
    for path, value in lora_before.items():
        np.testing.assert_array_equal(_flat(model.lm)[path], value)
    # The pos_embed of the 40-pixel checkpoint is kept as is (resized at run time).
    np.testing.assert_array_equal(model.sam.image_encoder.pos_embed[...][0],
                                  sam_state["image_encoder.pos_embed"][0])


def test_a_checkpoint_of_another_part_is_named(tmp_path):
    config = pixelllm_config.get_config("tiny").model
    model = _parts(sam=_abstract_sam(config), eva02=_abstract_eva02(config))
    eva_file = tmp_path / "eva02.safetensors"
    safetensors.numpy.save_file(_eva02_state(config), str(eva_file))
    with pytest.raises(ValueError, match=f"{eva_file}: not a SAM checkpoint"):
        load_pretrained(model, sam=eva_file)
    with pytest.raises(CheckpointMismatchError, match="EVA02 state dict"):
        load_pretrained(model, eva02=_sam_state(config))


# Mismatches name their file (issue: errors on bad input name the file), one test per loader
# family. The parts are abstract (nnx.eval_shape) where only the refusal is tested: a mismatch
# is found before any value is assigned.

def _parts(**parts):
    """A stand-in for PixelLLM with only the parts load_pretrained fills."""
    return types.SimpleNamespace(**parts)


def _abstract_sam(config):
    return abstract.build_abstract(lambda rngs: sam.Sam(**config.sam.to_dict(), rngs=rngs))


def _abstract_eva02(config):
    return abstract.build_abstract(lambda rngs: eva02.Eva02(**config.eva02.to_dict(), rngs=rngs))


def test_sam_file_with_a_misshaped_key_is_named(tmp_path):
    config = pixelllm_config.get_config("tiny").model
    state = _sam_state(config)
    state["mask_decoder.iou_token.weight"] = state["mask_decoder.iou_token.weight"][:, :-1]
    file = tmp_path / "sam_tiny.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, file)
    with pytest.raises(CheckpointMismatchError,
                       match=rf"(?s){re.escape(str(file))}: .*mask_decoder.iou_token.weight"):
        load_pretrained(_parts(sam=_abstract_sam(config)), sam=file)
    # load_sam reads its sizes from the file: a key of the wrong rank is named with the file.
    state["image_encoder.patch_embed.proj.weight"] = np.zeros((4, 4), np.float32)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, file)
    with pytest.raises(CheckpointMismatchError,
                       match=rf"{re.escape(str(file))}: SAM key image_encoder.patch_embed"):
        sam.load_sam(tmp_path)  # a folder: the message names the file read in it


def test_eva02_file_with_a_missing_key_is_named(tmp_path):
    config = pixelllm_config.get_config("tiny").model
    state = _eva02_state(config)
    del state["blocks.0.attn.q_proj.weight"]
    file = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state, str(file))
    with pytest.raises(CheckpointMismatchError,
                       match=rf"(?s){re.escape(str(file))}: .*missing keys: "
                             r"blocks.0.attn.q_proj.weight"):
        load_pretrained(_parts(eva02=_abstract_eva02(config)), eva02=tmp_path)


def _tiny_t5(config):
    return t5.T5(config.language_model.model, rngs=nnx.Rngs(0))


def test_t5_folder_with_a_misshaped_key_names_the_file_in_it(tmp_path):
    config = pixelllm_config.get_config("tiny").model
    folder = _t5_folder(config, tmp_path)
    state = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    state["lm_head.weight"] = state["lm_head.weight"][:-1]
    safetensors.numpy.save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError,
                       match=rf"{re.escape(str(folder / 'model.safetensors'))}: .*\n.*lm_head"):
        load_pretrained(_parts(lm=_tiny_t5(config)), language_model=folder)


def test_decoder_file_with_weights_of_another_kind_is_named(tmp_path):
    """Integer weights (a quantized file) are refused, not cast to float."""
    config = pixelllm_config.get_config("tiny_decoder").model
    lm = decoder.DecoderLM(config.language_model.model, rngs=nnx.Rngs(0))
    m = config.language_model.model
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
        tie_word_embeddings=m.tie_word_embeddings))
    state = _numpy(hf)
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"].astype(
        np.int8)
    file = tmp_path / "llama.safetensors"
    safetensors.numpy.save_file(state, str(file))
    before = np.asarray(lm.layers[1].mlp.up.kernel.get_value())
    with pytest.raises(CheckpointMismatchError,
                       match=rf"(?s){re.escape(str(file))}: .*dtype kind.*mlp/up/kernel "
                             r"\(checkpoint int8, model float32\)"):
        load_pretrained(_parts(lm=lm), language_model=file)
    np.testing.assert_array_equal(np.asarray(lm.layers[1].mlp.up.kernel.get_value()), before)


def _config_json(config, **changes):
    m = config.language_model.model
    return {"model_type": "t5", "vocab_size": m.vocab_size, "d_model": m.d_model, "d_kv": m.d_kv,
            "d_ff": m.d_ff, "num_layers": m.num_layers, "num_heads": m.num_heads,
            "feed_forward_proj": m.feed_forward_proj, "tie_word_embeddings": False,
            "dropout_rate": 0.1, **changes}


def test_a_config_json_of_another_architecture_with_fitting_shapes_is_named(tmp_path):
    config = pixelllm_config.get_config("tiny").model
    m = config.language_model.model
    folder = _t5_folder(config, tmp_path)
    # Twice the heads of half the width: every weight has the model's shape.
    (folder / "config.json").write_text(json.dumps(
        _config_json(config, num_heads=2 * m.num_heads, d_kv=m.d_kv // 2)))
    with pytest.raises(CheckpointMismatchError,
                       match=rf"{re.escape(str(folder / 'config.json'))}: .*num_heads "
                             rf"\(config.json {2 * m.num_heads}, model {m.num_heads}\)"):
        load_pretrained(_parts(lm=_tiny_t5(config)), language_model=folder)
    # A different training setting (dropout) is not an architecture mismatch.
    (folder / "config.json").write_text(json.dumps(_config_json(config, dropout_rate=0.3)))
    load_pretrained(_parts(lm=_tiny_t5(config)), language_model=folder)


def _word_level_tokenizer(path, size, added=()):
    """A ``tokenizer.json`` with ``size`` ids (``</s>`` among them), then ``added`` tokens."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, size)}}
    tokenizer = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_tokens(list(added))
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def test_the_tokenizer_must_fit_the_language_models_vocabulary(tmp_path):
    config = pixelllm_config.get_config("tiny").model
    vocab = config.language_model.model.vocab_size
    (tmp_path / "t5").mkdir()
    folder = _t5_folder(config, tmp_path / "t5")
    # Smaller than the model's padded vocabulary (as T5's 32,100 ids in 32,128 rows): fine.
    _word_level_tokenizer(folder / "tokenizer.json", vocab - 28)
    lm = _tiny_t5(config)
    load_pretrained(_parts(lm=lm), language_model=folder)
    # An added [SEG] past the last row: the folder's tokenizer is refused, both sides named.
    _word_level_tokenizer(folder / "tokenizer.json", vocab, added=["[SEG]"])
    with pytest.raises(ValueError) as error:
        load_pretrained(_parts(lm=lm), language_model=folder)
    message = str(error.value)
    assert str(folder / "tokenizer.json") in message
    assert f"{vocab + 1} ids" in message
    assert f"{vocab} embedding rows in {folder / 'model.safetensors'}" in message
    # Once the model has the row, it fits; a tokenizer given alone is checked against the model.
    lm.add_token_rows(1)
    load_pretrained(_parts(lm=lm), tokenizer=folder / "tokenizer.json")
    other = _word_level_tokenizer(tmp_path / "other" / "tokenizer.json", vocab + 5)
    with pytest.raises(ValueError, match=rf"{re.escape(str(other))} .* \(the model config's "
                                         rf"vocab_size {vocab} \+ 1 added token rows\)"):
        load_pretrained(_parts(lm=lm), tokenizer=other)
