"""T5 against transformers' `T5ForConditionalGeneration` (tiny random configs), its cache, LoRA,
converter and full sizes."""

import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from configs import t5 as t5_config
from pixelllm import sharding
from pixelllm.checkpoints.assign import CheckpointMismatchError
from pixelllm.checkpoints.state_dict import read_state_dict
from pixelllm.language import t5
from pixelllm.nn import lora

ATOL = 1e-4


def hf_config(model_cfg, *, feed_forward_proj="gated-gelu", tied=False):
    return HFT5Config(
        vocab_size=model_cfg.vocab_size, d_model=model_cfg.d_model, d_kv=model_cfg.d_kv,
        d_ff=model_cfg.d_ff, num_layers=model_cfg.num_layers,
        num_decoder_layers=model_cfg.num_decoder_layers, num_heads=model_cfg.num_heads,
        relative_attention_num_buckets=model_cfg.relative_attention_num_buckets,
        relative_attention_max_distance=model_cfg.relative_attention_max_distance,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=tied, dropout_rate=0.0,
        pad_token_id=model_cfg.pad_token_id, eos_token_id=model_cfg.eos_token_id,
        decoder_start_token_id=model_cfg.decoder_start_token_id, attn_implementation="eager")


def untie_lm_head(model, *, device=None):
    # transformers 5.x ties lm_head to `shared` at construction even with
    # tie_word_embeddings=False (from_pretrained unties it when a file carries its own).
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn(model.config.vocab_size, model.config.d_model, device=device))


def hf_tiny(*, feed_forward_proj="gated-gelu", tied=False, seed=0):
    """A tiny random HF T5 (norm scales perturbed so every tensor matters) and its weights written to
    ``model.safetensors`` (every key, as the published Flan-T5 files hold them) and read back with
    ``read_state_dict``. (transformers 5 drops the hand-untied lm_head in ``save_pretrained``.)"""
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(
        hf_config(t5_config.get_config("tiny").model, feed_forward_proj=feed_forward_proj,
                  tied=tied)).eval()
    if not tied:
        untie_lm_head(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        safetensors.numpy.save_file(state, f"{folder}/model.safetensors")
        return model, read_state_dict(folder)


def ours_tiny(state, *, lora_b=0.0, lora_settings=None, **overrides):
    """Our tiny T5 (configs/t5.py:tiny, rank-4 adapters on q and v unless overridden) with HF's
    weights; adapters get random A and `lora_b` x N(0, 1) for B.

    Built with nnx.eval_shape and filled from arrays: no random initialisation to compile, and
    models of one config share every jit cache entry.
    """
    cfg = t5_config.get_config("tiny").model
    cfg.update(overrides)
    cfg.lora.update(lora_settings or {})
    model = nnx.eval_shape(lambda: t5.T5(cfg, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(0)
    adapters = {}
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        shape = v.get_value().shape
        adapters["/".join(map(str, path))] = (rng.uniform(-0.3, 0.3, shape) if path[-1] == "lora_a"
                                              else lora_b * rng.normal(size=shape))
    lora.load_lora_arrays(model, adapters, source="test adapters")
    return t5.load(model, state, source="hf tiny")


@nnx.jit
def encode_tokens(model, tokens, mask):
    return model.encode(tokens=tokens, input_mask=mask)


@nnx.jit
def encode_embeddings(model, embeddings, mask):
    return model.encode(embeddings=embeddings, input_mask=mask)


@nnx.jit
def decode_full(model, tokens, encoded, mask):
    """Teacher forcing at positions 0..L-1, no cache."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model.decode(tokens=tokens, positions=positions, encoded=encoded, encoder_mask=mask)


@nnx.jit
def decode_cached(model, tokens, positions, cache):
    return model.decode(tokens=tokens, positions=positions, cache=cache)


@nnx.jit(static_argnums=3)
def init_cache(model, encoded, mask, max_length):
    return model.init_cache(encoded, mask, max_length, jnp.float32)


def run_full(model, tokens, mask, dec):
    mask = jnp.asarray(mask)
    return decode_full(model, jnp.asarray(dec), encode_tokens(model, jnp.asarray(tokens), mask),
                       mask)


def hidden_hook(hf_model):
    """Captures the decoder output after its final norm (what the point head reads)."""
    captured = []
    hf_model.decoder.final_layer_norm.register_forward_hook(lambda m, i, o: captured.append(o))
    return captured


def batch(seed=0, batch=2, enc_len=40, dec_len=7, vocab=128):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab, (batch, enc_len))
    mask = np.ones((batch, enc_len), np.int64)
    mask[1, 29:] = 0  # right padding in the second example
    dec = rng.integers(2, vocab, (batch, dec_len))
    dec[:, 0] = 0  # decoder start
    return tokens, mask, dec


def max_diff(ours, ref):
    return float(np.abs(np.asarray(ours, np.float64) - ref.detach().numpy()).max())


def check_parity(hf_model, model, *, visual=0):
    """Encoder output, decoder logits and hidden within ATOL; `visual` random embeddings replace
    the first encoder tokens (PixelLLM's visual tokens) through `inputs_embeds`."""
    tokens, mask, dec = batch()
    captured = hidden_hook(hf_model)
    torch.manual_seed(1)
    with torch.no_grad():
        embeds = hf_model.shared(torch.from_numpy(tokens)).clone()
        embeds[:, :visual] = torch.randn(tokens.shape[0], visual, embeds.shape[-1])
        ref = hf_model(inputs_embeds=embeds, attention_mask=torch.from_numpy(mask),
                       decoder_input_ids=torch.from_numpy(dec))
    context = model.embed(jnp.asarray(tokens[:, visual:]))
    embeddings = jnp.concatenate([jnp.asarray(embeds[:, :visual].numpy()), context], 1)
    encoded = encode_embeddings(model, embeddings, jnp.asarray(mask))
    out = decode_full(model, jnp.asarray(dec), encoded, jnp.asarray(mask))
    diffs = {"encoder": max_diff(encoded, ref.encoder_last_hidden_state),
             "logits": max_diff(out.logits, ref.logits),
             "hidden": max_diff(out.hidden, captured[-1])}
    assert out.logits.dtype == jnp.float32
    assert out.logits.shape == (*dec.shape, 128) and out.hidden.shape == (*dec.shape, 64)
    assert max(diffs.values()) <= ATOL, diffs
    return diffs


def test_t5_parity_with_transformers():
    hf_model, state = hf_tiny()
    model = ours_tiny(state)
    check_parity(hf_model, model, visual=0)
    # Visual tokens as encoder input embeddings, context tokens after them, padding masked.
    check_parity(hf_model, model, visual=5)
    tokens, mask, _ = batch()
    with torch.no_grad():
        ref = hf_model.encoder(input_ids=torch.from_numpy(tokens),
                               attention_mask=torch.from_numpy(mask)).last_hidden_state
    assert max_diff(encode_tokens(model, jnp.asarray(tokens), jnp.asarray(mask)), ref) <= ATOL


def test_t5_tied_relu_parity_with_transformers():
    hf_model, state = hf_tiny(feed_forward_proj="relu", tied=True)
    assert "lm_head.weight" in state  # a copy of shared.weight, accepted because equal
    model = ours_tiny(state, feed_forward_proj="relu", tie_word_embeddings=True,
                      scale_decoder_outputs=True)
    assert model.lm_head is None
    check_parity(hf_model, model, visual=3)


def test_t5_tied_without_rescale_parity_with_transformers():
    """transformers 5.x always ties T5's output projection to `shared` and rescales by
    d_model**-0.5 only when `config.scale_decoder_outputs`; a tied file without the rescale loads
    exactly with the two flags set apart (with the rescale its logits would be sqrt(d) smaller)."""
    hf_model, state = hf_tiny(tied=True, seed=2)
    hf_model.config.scale_decoder_outputs = False
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    model = ours_tiny(state, tie_word_embeddings=True, scale_decoder_outputs=False)
    assert model.lm_head is None
    check_parity(hf_model, model, visual=2)
    rescaled = ours_tiny(state, tie_word_embeddings=True, scale_decoder_outputs=True)
    tokens, mask, dec = batch()
    plain, scaled = (run_full(m, tokens, mask, dec).logits for m in (model, rescaled))
    np.testing.assert_allclose(np.asarray(scaled) * 64 ** 0.5, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_relative_position_bucket_parity_with_transformers(num_buckets, max_distance,
                                                              bidirectional):
    relative = np.arange(-600, 601)
    ref = T5Attention._relative_position_bucket(
        torch.from_numpy(relative), bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance).numpy()
    ours = t5.relative_position_bucket(jnp.asarray(relative), bidirectional=bidirectional,
                                       num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(np.asarray(ours), ref)
    # The range reaches every bucket (bucket num_buckets/2, "after, distance 0", cannot occur).
    assert len(np.unique(ref)) == num_buckets - bidirectional


def test_t5_cached_decoding_matches_teacher_forcing():
    _, state = hf_tiny()
    # Non-zero adapters, so the cached cross-attention keys/values must include them.
    model = ours_tiny(state, lora_b=0.1)
    tokens, mask, dec = batch(dec_len=8)
    encoded = encode_tokens(model, jnp.asarray(tokens), jnp.asarray(mask))
    full = decode_full(model, jnp.asarray(dec), encoded, jnp.asarray(mask))

    # Right-padded prefill of per-sequence lengths 2 and 3, then one token at a time.
    lengths = np.array([2, 3])
    prefill = np.where(np.arange(3) < lengths[:, None], dec[:, :3], 0)
    cache = init_cache(model, encoded, jnp.asarray(mask), 10)
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(cache))
    assert cache["layers"][0]["cross_k"].shape == (2, 40, 4, 16)
    out = decode_cached(model, jnp.asarray(prefill), jnp.broadcast_to(jnp.arange(3), (2, 3)), cache)
    logits = {b: [out.logits[b, i] for i in range(lengths[b])] for b in range(2)}
    hidden = {b: [out.hidden[b, i] for i in range(lengths[b])] for b in range(2)}
    cache = out.cache
    for t in range(6):
        pos = lengths + t
        tok = dec[np.arange(2), np.minimum(pos, 7)]
        out = decode_cached(model, jnp.asarray(tok[:, None]), jnp.asarray(pos[:, None]), cache)
        cache = out.cache
        for b in range(2):
            if pos[b] < 8:
                logits[b].append(out.logits[b, 0])
                hidden[b].append(out.hidden[b, 0])
    for b in range(2):
        np.testing.assert_allclose(np.stack(logits[b]), np.asarray(full.logits[b]), atol=ATOL)
        np.testing.assert_allclose(np.stack(hidden[b]), np.asarray(full.hidden[b]), atol=ATOL)


def test_t5_greedy_parity_with_transformers_generate():
    hf_model, state = hf_tiny(seed=2)
    model = ours_tiny(state)
    tokens, mask, _ = batch(seed=3)
    with torch.no_grad():
        ref = hf_model.generate(input_ids=torch.from_numpy(tokens),
                                attention_mask=torch.from_numpy(mask), do_sample=False,
                                num_beams=1, max_new_tokens=8, min_new_tokens=0).numpy()
    encoded = encode_tokens(model, jnp.asarray(tokens), jnp.asarray(mask))
    cache = init_cache(model, encoded, jnp.asarray(mask), 8)
    current = np.zeros((2,), np.int64)  # decoder start
    done = np.zeros((2,), bool)
    generated = [current]
    for t in range(8):
        out = decode_cached(model, jnp.asarray(current[:, None]), jnp.full((2, 1), t), cache)
        cache = out.cache
        current = np.where(done, 0, np.asarray(out.logits[:, 0]).argmax(-1))  # pad after EOS
        done |= current == 1
        generated.append(current)
        if done.all():
            break
    generated = np.stack(generated, 1)
    np.testing.assert_array_equal(generated, ref)
    assert generated.shape[1] > 2


def full_size_counts(variant):
    cfg = t5_config.get_config(variant).model
    model = nnx.eval_shape(lambda: t5.T5(cfg, rngs=nnx.Rngs(0)))
    sizes = {}
    for path, v in nnx.to_flat_state(nnx.state(model)):
        assert len(v.get_metadata()["logical_axes"]) == len(v.get_value().shape), path
        kind = "lora" if isinstance(v, nnx.LoRAParam) else "base"
        sizes[kind] = sizes.get(kind, 0) + int(np.prod(v.get_value().shape))
    return cfg, sizes


def test_t5_flan_t5_xl_parameter_count_matches_transformers():
    cfg, ours = full_size_counts("flan_t5_xl")
    with torch.device("meta"):
        hf_model = T5ForConditionalGeneration(hf_config(cfg))
        untie_lm_head(hf_model, device="meta")
    expected = sum(p.numel() for p in hf_model.parameters())  # shared embedding counted once
    assert ours["base"] == expected == 2_849_757_184
    # Official PixelLLM LoRA: rank 32 on q and v of 24 encoder self-, 24 decoder self- and 24
    # cross-attention layers, r * (in + out) each.
    assert cfg.lora.rank == 32 and cfg.lora.alpha / cfg.lora.rank == 2.0
    assert ours["lora"] == 72 * 2 * 32 * (2048 + 2048)


def test_t5_lora_zero_b_equals_base_and_only_adapters_train():
    _, state = hf_tiny()
    adapted = ours_tiny(state)  # rank 4 on q, v; B = 0
    base = ours_tiny(state, lora_settings={"rank": 0})
    tokens, mask, dec = batch()

    def run(model):
        return np.asarray(run_full(model, tokens, mask, dec).logits)

    np.testing.assert_array_equal(run(adapted), run(base))
    assert not nnx.state(base, nnx.Param)  # frozen base: nothing trainable without adapters
    trainable = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(adapted, nnx.Param))}
    expected = {f"encoder/layers/{i}/self_attention/{n}/lora_{ab}"
                for i in range(2) for n in "qv" for ab in "ab"}
    expected |= {f"decoder/layers/{i}/{kind}/{n}/lora_{ab}" for i in range(2)
                 for kind in ("self_attention", "cross_attention") for n in "qv" for ab in "ab"}
    assert trainable == expected
    assert adapted.encoder.layers[0].self_attention.q.scale == 2.0  # alpha 8 / rank 4
    adapted.decoder.layers[1].cross_attention.v.lora_b.set_value(jnp.ones((4, 64)))
    assert np.abs(run(adapted) - run(base)).max() > 1e-2
    # Reloading base weights leaves the adapters alone.
    t5.load(adapted, state, source="again")
    assert float(adapted.decoder.layers[1].cross_attention.v.lora_b.get_value().min()) == 1.0


@pytest.mark.parametrize("ffn,targets", [("gated-gelu", ("q", "k", "v", "o", "wi_0", "wi_1", "wo")),
                                         ("relu", ("o", "wi"))])
def test_t5_lora_targets_and_sizes(ffn, targets):
    cfg = t5_config.get_config("tiny").model
    cfg.feed_forward_proj = ffn
    cfg.lora.update(rank=3, alpha=6.0, targets=targets)
    model = nnx.eval_shape(lambda: t5.T5(cfg, rngs=nnx.Rngs(0)))
    sizes = {"/".join(map(str, p)): v.get_value().shape
             for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    # 2 encoder self-attentions, 2 decoder self- and 2 cross-attentions; 4 feed-forwards.
    in_out = {"q": (64, 64), "k": (64, 64), "v": (64, 64), "o": (64, 64), "wi": (64, 128),
              "wi_0": (64, 128), "wi_1": (64, 128), "wo": (128, 64)}
    copies = {name: 4 if name.startswith("w") else 6 for name in targets}
    assert sum(np.prod(s) for s in sizes.values()) == sum(
        copies[n] * 3 * sum(in_out[n]) for n in targets)
    assert {path.split("/")[-2] for path in sizes} == set(targets)
    assert all(isinstance(v, lora.FrozenParam)
               for _, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam))))


def test_t5_dropout_only_with_rngs():
    _, state = hf_tiny()
    model = ours_tiny(state)
    assert model.config.dropout_rate == 0.1
    tokens, mask, _ = batch()
    plain = np.asarray(encode_tokens(model, jnp.asarray(tokens), jnp.asarray(mask)))
    np.testing.assert_array_equal(
        np.asarray(encode_tokens(model, jnp.asarray(tokens), jnp.asarray(mask))), plain)
    encode = nnx.jit(lambda m, rngs: m.encode(tokens=jnp.asarray(tokens),
                                              input_mask=jnp.asarray(mask), rngs=rngs))
    a = np.asarray(encode(model, nnx.Rngs(dropout=0)))
    np.testing.assert_array_equal(np.asarray(encode(model, nnx.Rngs(dropout=0))), a)
    assert np.abs(a - plain).max() > 1e-2


def base_model(**overrides):
    """Our tiny T5 as an abstract shape tree, for loading into."""
    cfg = t5_config.get_config("tiny").model
    cfg.update(overrides)
    return nnx.eval_shape(lambda: t5.T5(cfg, rngs=nnx.Rngs(1)))


@pytest.mark.parametrize("case", ["missing", "extra", "misshaped", "copy_differs", "untied_file"])
def test_t5_loader_names_the_file_and_bad_keys(case):
    _, state = hf_tiny()
    key = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    if case == "missing":
        del state[key]
        line = f"1 missing keys: {key}"
    elif case == "extra":
        key = "decoder.block.2.layer.0.SelfAttention.q.weight"
        state[key] = np.zeros((64, 64), np.float32)
        line = f"1 unexpected keys: {key}"
    elif case == "misshaped":
        state[key] = np.zeros((64, 32), np.float32)
        line = (f"1 mis-shaped keys: {key} (file (64, 32), after transpose (32, 64); model "
                "decoder/layers/1/cross_attention/k/kernel (64, 64))")
    elif case == "copy_differs":
        key = "decoder.embed_tokens.weight"
        state[key] = state[key] + 1.0
        line = f"tied keys that differ: {key} and encoder.embed_tokens.weight (both give embedding)"
    else:
        # A tied model takes lm_head.weight as a copy of the embedding.
        key = "lm_head.weight"
        line = f"tied keys that differ: decoder.embed_tokens.weight and {key} (both give embedding)"
    model = base_model(tie_word_embeddings=case == "untied_file")
    with pytest.raises(CheckpointMismatchError) as raised:
        t5.load(model, state, source="bad.safetensors")
    message = str(raised.value)
    assert message.startswith("bad.safetensors: checkpoint does not match the model\n")
    assert line in message


def test_t5_loader_hints_at_a_tied_file():
    _, state = hf_tiny(tied=True)
    del state["lm_head.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"^tied\.safetensors: .*; the file has no "
                       r"lm_head\.weight: this looks like a tied T5 \(tie_word_embeddings=True\)"
                       r"\n  1 missing keys: lm_head\.weight$"):
        t5.load(base_model(), state, source="tied.safetensors")


def test_t5_loader_layouts_and_dtype():
    _, state = hf_tiny()
    assert {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} <= set(state)
    model = t5.load(base_model(param_dtype="bfloat16"), state, source="hf tiny")
    kernel = model.encoder.layers[1].self_attention.q.kernel.get_value()
    assert kernel.dtype == jnp.bfloat16 and model.lm_head.get_value().dtype == jnp.bfloat16
    q = state["encoder.block.1.layer.0.SelfAttention.q.weight"]
    np.testing.assert_array_equal(kernel, q.T.astype(jnp.bfloat16))
    np.testing.assert_array_equal(model.lm_head.get_value(),
                                  state["lm_head.weight"].T.astype(jnp.bfloat16))
    # A file that dropped shared.weight but kept a copy loads the same embedding.
    del state["shared.weight"], state["decoder.embed_tokens.weight"]
    model = t5.load(base_model(), state, source="hf tiny")
    np.testing.assert_array_equal(model.embedding.get_value(),
                                  state["encoder.embed_tokens.weight"])


def test_t5_bfloat16_runs_close_to_float32():
    hf_model, state = hf_tiny()
    f32 = ours_tiny(state)
    bf16 = ours_tiny(state, dtype="bfloat16", param_dtype="bfloat16")
    tokens, mask, dec = batch()
    outs = [run_full(model, tokens, mask, dec) for model in (f32, bf16)]
    assert outs[1].logits.dtype == jnp.float32 and outs[1].hidden.dtype == jnp.bfloat16
    scale = float(jnp.abs(outs[0].logits).max())
    assert float(jnp.abs(outs[1].logits - outs[0].logits).max()) < 0.05 * scale


@pytest.mark.parametrize("variant", ["tiny", "flan_t5_small", "flan_t5_base", "flan_t5_large",
                                     "flan_t5_xl", "flan_t5_xxl"])
def test_t5_configs_build(variant):
    cfg = t5.T5Config.from_config(t5_config.get_config(variant).model)
    assert cfg.vocab_size == (128 if variant == "tiny" else 32128)
    assert cfg.lora.targets == ("q", "v") and cfg.lora.scale == 2.0 and cfg.frozen
    assert cfg.activation == "gelu_tanh" and not cfg.tie_word_embeddings
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        t5.T5Config.from_config({**t5_config.get_config(variant).model.to_dict(),
                                 "lora": {"targets": ("q_proj",)}})


def test_t5_sharded_model_and_cache_match_single_device():
    """Mesh (2, 2, 2): sharded weights and a cache sharded by its logical axes (cross-attention
    keys/values included) give the unsharded cached decoding."""
    _, state = hf_tiny(seed=4)
    tokens, mask, dec = batch(seed=5, batch=4)
    mesh = sharding.make_mesh((2, 2, 2))

    def run(model, shard):
        encoded = encode_tokens(model, jnp.asarray(tokens), jnp.asarray(mask))
        cache = init_cache(model, encoded, jnp.asarray(mask), 8)
        if shard:
            cache = jax.device_put(cache, sharding.array_shardings(
                cache, model.cache_logical_axes(cache), mesh, sharding.DEFAULT_RULES))
        logits = []
        for i in range(dec.shape[1]):
            out = decode_cached(model, jnp.asarray(dec[:, i:i + 1]), jnp.full((4, 1), i), cache)
            cache = out.cache
            logits.append(np.asarray(out.logits[:, 0]))
        return np.stack(logits), cache

    expected, _ = run(ours_tiny(state, lora_b=0.1), shard=False)
    model = sharding.shard_model(ours_tiny(state, lora_b=0.1), mesh, sharding.DEFAULT_RULES)
    got, cache = run(model, shard=True)
    np.testing.assert_allclose(got, expected, atol=ATOL)
    assert cache["layers"][0]["cross_k"].sharding.spec[0] == ("data", "fsdp")


def test_dropout_masks_are_shared_over_positions_as_the_official_t5():
    """t5x (the official T5) drops with ``broadcast_dims=(-2,)``: one mask per example and
    feature, the same at every position; ``dropout_shared_over_positions=False`` draws per
    element, as HF."""
    x = jnp.ones((2, 6, 16))
    shared = t5.T5Config(vocab_size=8, d_model=16, d_kv=4, d_ff=8, num_layers=1,
                         num_decoder_layers=1, num_heads=4, dropout_rate=0.5)
    dropped = np.asarray(t5._dropout(x, shared, nnx.Rngs(dropout=0)))
    assert set(np.unique(dropped)) == {0.0, 2.0}
    np.testing.assert_array_equal(dropped, np.broadcast_to(dropped[:, :1], dropped.shape))
    assert not (dropped[0] == dropped[1]).all()          # examples draw their own masks
    per_element = dataclasses.replace(shared, dropout_shared_over_positions=False)
    dropped = np.asarray(t5._dropout(x, per_element, nnx.Rngs(dropout=0)))
    assert not (dropped == dropped[:, :1]).all()
    np.testing.assert_array_equal(t5._dropout(x, shared, None), x)
