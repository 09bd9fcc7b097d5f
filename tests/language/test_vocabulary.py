"""check_vocabulary: a tokenizer must not produce ids past the model's vocabulary; a smaller one
(a padded model vocabulary) fits."""

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers

from pixelllm.language.hf_tokenizer import HFTokenizer
from pixelllm.language.vocabulary import check_vocabulary


def _tokenizer_json(path, vocab, added=()):
    tokenizer = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_tokens(list(added))
    tokenizer.save(str(path))
    return HFTokenizer(path)


def _words(size):
    return {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, size)}}


def test_a_tokenizer_within_the_models_vocabulary_fits(tmp_path):
    tokenizer = _tokenizer_json(tmp_path / "tokenizer.json", _words(100))
    check_vocabulary(tokenizer, 100, model_source="exact")
    # As T5: 32,100 tokenizer ids in 32,128 embedding rows.
    check_vocabulary(tokenizer, 128, model_source="padded")


def test_an_added_token_past_the_model_names_both_sides(tmp_path):
    tokenizer = _tokenizer_json(tmp_path / "tokenizer.json", _words(100), added=["[SEG]"])
    assert tokenizer.encode("w5 [SEG]") == [5, 100]
    with pytest.raises(ValueError) as error:
        check_vocabulary(tokenizer, 100, model_source="100 embedding rows in model.safetensors")
    message = str(error.value)
    assert str(tmp_path / "tokenizer.json") in message
    assert "101 ids" in message and "100 embedding rows in model.safetensors" in message
    assert "lm.add_token_rows(1)" in message
    check_vocabulary(tokenizer, 101, model_source="with the added row")
    with pytest.raises(ValueError, match="data/tok.json"):
        check_vocabulary(tokenizer, 100, model_source="m", tokenizer_source="data/tok.json")


def test_ids_with_gaps_count_to_the_largest(tmp_path):
    """A file whose ids skip numbers: the largest id decides, not the number of tokens."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "far": 40}
    tokenizer = _tokenizer_json(tmp_path / "tokenizer.json", vocab)
    assert tokenizer.encode("far") == [40]
    assert tokenizer.vocab_size == 41
    assert tokenizer.decode([40]) == "far"
    with pytest.raises(ValueError, match="41 ids"):
        check_vocabulary(tokenizer, 32, model_source="m")
