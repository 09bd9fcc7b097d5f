"""Tokenizers: parity with transformers, round trips, special ids, word alignment, errors.

Tiny tokenizers are trained here, in the layouts of the real families: SentencePiece unigram
(T5, with and without byte fallback), SentencePiece BPE with byte fallback (Llama 2, Gemma), a
byte-level BPE ``tokenizer.json`` (Llama 3) and ``tokenizer.json`` files that transformers converts
from the SentencePiece models (as Hugging Face repositories ship them).
"""

import io
import json
import re
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer
from transformers import GemmaTokenizer, LlamaTokenizer, PreTrainedTokenizerFast, T5Tokenizer

from pixelllm.language.hf_tokenizer import HFTokenizer
from pixelllm.language.sentencepiece_tokenizer import SentencePieceTokenizer
from pixelllm.language.tokenizer import (TokenizerFileError, align_to_words, load_tokenizer,
                                         word_spans)

CORPUS = [
    "In this image we can see a dog sitting on the grass, and there are trees in the background.",
    "A man in a red shirt is riding a bicycle down the street.",
    "The woman is holding an umbrella while walking in the rain.",
    "Two children are playing with a ball near the river bank.",
    "On the left side of the picture there is a building with glass windows.",
    "At the top we can see the sky with clouds. It's a sunny day!",
    "There is a table with plates, cups, and a bottle of water on it.",
    "In the front there are people standing and looking at something.",
    "We can see a café named \"Zoë's\" (maybe) with 2 floors; it is 10 meters high?",
    "Here I can see a poster: \"Sale - 50% off\" & a logo [blue].",
]

# Captions written only with characters of the corpus, like Localized Narratives ones.
CAPTIONS = [
    "In this image I can see a woman holding an umbrella, and she is walking on the road.",
    "On the left side there are trees, poles and a building with glass windows.",
    "In the background there's a café named \"Zoë's\" (maybe) with 2 floors.",
    "At the top of the image we can see the sky; it's a sunny day!",
]
# Characters no tokenizer was trained on: emoji, CJK, symbols (byte fallback or unk).
OOV_CAPTIONS = [
    "A snowman ☃ next to a 🙂 sign and 日本語 text.",
    "Prices: 5€ or ¥300 — naïve™ offer…",
]
MESSY = [
    "  leading spaces, double  spaces\tand a tab ",
    "line one\nline two\n",
    "x",
    "",
]
SENTENCES = CAPTIONS + OOV_CAPTIONS + ["Hello wörld, it's 2024!", "(a) [b] {c} <d> 3.14 #1 @home"]

# Llama 3's pre-tokenizer split pattern.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|finetune_right_pad_id|>", "<|eot_id|>"]


def _train_spm(path, **options):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 10), model_writer=model,
                                   minloglevel=2, num_threads=1, character_coverage=1.0, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def _llama3_tokenizer_json(path):
    """A Llama-3-like byte-level BPE: regex split, ByteLevel, specials after the vocabulary,
    ``<|begin_of_text|> $A`` template."""
    tok = RustTokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in _LLAMA3_SPECIALS])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    t5 = _train_spm(root / "t5" / "spiece.model", model_type="unigram", vocab_size=120,
                    pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    unigram_bf = _train_spm(root / "unigram_bf" / "tokenizer.model", model_type="unigram",
                            vocab_size=340, byte_fallback=True, pad_id=0, eos_id=1, unk_id=2,
                            bos_id=-1)
    llama2 = _train_spm(root / "llama2" / "tokenizer.model", model_type="bpe", vocab_size=340,
                        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                        split_digits=True, normalization_rule_name="identity",
                        remove_extra_whitespaces=False, add_dummy_prefix=True)
    gemma = _train_spm(root / "gemma" / "tokenizer.model", model_type="bpe", vocab_size=340,
                       byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                       pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                       split_digits=True, normalization_rule_name="identity",
                       remove_extra_whitespaces=False, add_dummy_prefix=False,
                       allow_whitespace_only_pieces=True,
                       user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    # tokenizer.json files as transformers converts the SentencePiece models.
    GemmaTokenizer.from_pretrained(str(gemma.parent)).save_pretrained(str(root / "gemma_json"))
    T5Tokenizer.from_pretrained(str(t5.parent)).save_pretrained(str(root / "t5_json"))
    llama3 = _llama3_tokenizer_json(root / "llama3" / "tokenizer.json")
    llama3_instruct = root / "llama3_instruct" / "tokenizer.json"
    llama3_instruct.parent.mkdir()
    shutil.copy(llama3, llama3_instruct)
    (llama3_instruct.parent / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}}))
    (llama3_instruct.parent / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [_id(llama3, "<|end_of_text|>"), _id(llama3, "<|eot_id|>")]}))
    return {"t5": t5, "unigram_bf": unigram_bf, "llama2": llama2, "gemma": gemma,
            "gemma_json": root / "gemma_json" / "tokenizer.json",
            "t5_json": root / "t5_json" / "tokenizer.json",
            "llama3": llama3, "llama3_instruct": llama3_instruct}


def _id(tokenizer_json, token):
    return RustTokenizer.from_file(str(tokenizer_json)).token_to_id(token)


# name -> (file key, whether words after the first are encoded with their leading space in the
# per-word reference, whether decoding is lossless for any text)
CASES = {
    "t5": ("t5", False, False),
    "unigram_bf": ("unigram_bf", False, False),
    "llama2": ("llama2", False, True),
    "gemma": ("gemma", True, True),
    "gemma_json": ("gemma_json", True, True),
    "t5_json": ("t5_json", False, False),
    "llama3": ("llama3", True, True),
}


@pytest.fixture(scope="module")
def toks(files):
    return {name: load_tokenizer(files[key]) for name, (key, _, _) in CASES.items()}


def _reference(hf_tokenizer, text):
    return hf_tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- parity with transformers


def test_sentencepiece_t5_parity_with_transformers(files, toks):
    tok = toks["t5"]
    ref = T5Tokenizer.from_pretrained(str(files["t5"].parent))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 1, 0)
    assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (None, 1, 0)
    unk_seen = False
    for text in SENTENCES + MESSY:
        ids = tok.encode(text)
        assert ids == _reference(ref, text), text
        # transformers' T5 appends </s> by default.
        assert tok.encode(text, add_eos=True) == ref.encode(text), text
        unk_seen |= 2 in ids
    assert unk_seen  # out-of-vocabulary characters really were exercised


def test_sentencepiece_unigram_byte_fallback_parity_with_transformers(files, toks):
    tok = toks["unigram_bf"]
    # The generic transformers conversion follows the model's own settings (byte fallback
    # included); T5Tokenizer's conversion always drops byte fallback, as real T5 has none.
    ref = PreTrainedTokenizerFast.from_pretrained(str(files["unigram_bf"].parent))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (None, 1, 0, 340)
    byte_pieces = 0
    for text in SENTENCES + MESSY:
        ids = tok.encode(text)
        assert ids == _reference(ref, text), text
        byte_pieces += sum(3 <= i < 259 for i in ids)
    assert byte_pieces > 0


def test_sentencepiece_llama2_parity_with_transformers(files, toks):
    tok = toks["llama2"]
    # add_bos_token as the Llama 2 repositories' tokenizer_config.json sets it.
    ref = LlamaTokenizer.from_pretrained(str(files["llama2"].parent), add_bos_token=True)
    assert (tok.bos_id, tok.eos_id) == (1, 2) == (ref.bos_token_id, ref.eos_token_id)
    assert ref.pad_token_id is None and tok.pad_id == tok.eos_id  # no pad in the file
    # transformers' Llama conversion drops one of several leading spaces (its legacy Metaspace
    # handling), unlike SentencePiece, the original Llama 2 tokenizer; MESSY[0] starts so.
    for text in SENTENCES + MESSY[1:]:
        assert tok.encode(text) == _reference(ref, text), text
        assert tok.encode(text, add_bos=True) == ref.encode(text), text


def test_sentencepiece_gemma_parity_with_transformers(files, toks):
    tok = toks["gemma"]
    ref = GemmaTokenizer.from_pretrained(str(files["gemma"].parent), add_bos_token=True)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert (ref.pad_token_id, ref.eos_token_id, ref.bos_token_id) == (0, 1, 2)
    for text in SENTENCES + MESSY + ["<start_of_turn>user\nhi<end_of_turn>"]:
        assert tok.encode(text) == _reference(ref, text), text
        assert tok.encode(text, add_bos=True) == ref.encode(text), text


def test_hf_llama3_parity_with_transformers(files, toks):
    tok = toks["llama3"]
    assert isinstance(tok, HFTokenizer)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(files["llama3"]),
                                  bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    # No config next to the file: bos from the template, eos and pad from their usual names.
    assert tok.bos_id == _id(files["llama3"], "<|begin_of_text|>") == ref.bos_token_id
    assert tok.eos_id == _id(files["llama3"], "<|end_of_text|>") == ref.eos_token_id
    assert tok.pad_id == _id(files["llama3"], "<|finetune_right_pad_id|>")
    assert tok.vocab_size == len(ref) == _id(files["llama3"], _LLAMA3_SPECIALS[-1]) + 1
    for text in SENTENCES + MESSY:
        assert tok.encode(text) == _reference(ref, text), text
        assert tok.encode(text, add_bos=True) == ref.encode(text), text
        ids = ref.encode(text) + [tok.eos_id]
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


@pytest.mark.parametrize("family", ["gemma", "t5"])
def test_hf_tokenizer_json_parity_with_sentencepiece(family, files, toks):
    """transformers' tokenizer.json of a SentencePiece model encodes, aligns and decodes alike."""
    sp_tok, hf_tok = toks[family], toks[f"{family}_json"]
    assert isinstance(hf_tok, HFTokenizer)
    assert (hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id) == (sp_tok.bos_id, sp_tok.eos_id,
                                                             sp_tok.pad_id)
    for text in SENTENCES + MESSY:
        assert hf_tok.encode_with_alignment(text) == sp_tok.encode_with_alignment(text), text
    # SentencePiece writes the unknown token as " ⁇ ", tokenizers as "<unk>": compare without.
    for text in CAPTIONS + MESSY[:2]:
        ids = sp_tok.encode(text)
        assert hf_tok.decode(ids) == sp_tok.decode(ids), text


# ---------------------------------------------------------------- round trips and special ids


@pytest.mark.parametrize("name", CASES)
def test_decode_round_trips(name, toks):
    tok = toks[name]
    # T5-style models normalize (NFKC, folded whitespace) and may emit unk: captions only.
    lossless = CASES[name][2]
    for text in CAPTIONS + (OOV_CAPTIONS + MESSY if lossless else []):
        ids = tok.encode(text)
        assert tok.decode(ids) == text, text
        assert tok.decode(np.asarray(ids)) == text
        assert tok.decode(tok.encode(text, add_eos=True) + ids) == text  # stops at eos


def test_t5_decode_drops_decoder_start_pad_and_folds_whitespace(toks):
    tok = toks["t5"]
    text = CAPTIONS[0]
    out = [tok.pad_id] + tok.encode(text) + [tok.eos_id] + [tok.pad_id] * 3
    assert tok.decode(out) == text
    assert tok.decode(tok.encode(MESSY[0])) == " ".join(MESSY[0].split())
    with pytest.raises(ValueError, match=r"defines no beginning-of-sequence token"):
        tok.encode(text, add_bos=True)


def test_llama3_instruct_roles_come_from_the_config_files(files):
    tok = load_tokenizer(files["llama3_instruct"].parent)
    eot, end = _id(files["llama3"], "<|eot_id|>"), _id(files["llama3"], "<|end_of_text|>")
    assert tok.eos_id == eot
    assert tok.stop_ids == {eot, end}
    ids = tok.encode("a dog", add_bos=True)
    assert ids[0] == tok.bos_id == _id(files["llama3"], "<|begin_of_text|>")
    assert tok.decode(ids + [end] + tok.encode(" and a cat")) == "a dog"
    assert tok.decode(ids + [eot] + tok.encode(" and a cat")) == "a dog"
    assert tok.decode([_id(files["llama3"], "<|reserved_special_token_0|>")] + ids) == "a dog"
    overridden = HFTokenizer(files["llama3_instruct"], eos_token="<|end_of_text|>")
    assert overridden.eos_id == end


def test_gemma_tokenizer_json_roles_without_config(files, tmp_path):
    alone = tmp_path / "tokenizer.json"
    shutil.copy(files["gemma_json"], alone)
    tok = HFTokenizer(alone)  # roles from the usual names <bos>, <eos>, <pad>
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)


def test_padding_and_truncation_saved_in_the_file_are_ignored(files, toks, tmp_path):
    saved = RustTokenizer.from_file(str(files["llama3"]))
    saved.enable_padding(length=64, pad_id=_id(files["llama3"], "<|finetune_right_pad_id|>"),
                         pad_token="<|finetune_right_pad_id|>")
    saved.enable_truncation(max_length=3)
    saved.save(str(tmp_path / "tokenizer.json"))
    ours = HFTokenizer(tmp_path / "tokenizer.json")
    ids = toks["llama3"].encode(CAPTIONS[0])
    assert 3 < len(ids) < 64
    assert ours.encode(CAPTIONS[0]) == ids
    assert ours.encode_with_alignment(CAPTIONS[0]) == toks["llama3"].encode_with_alignment(
        CAPTIONS[0])


def test_decode_rejects_ids_outside_the_vocabulary(toks):
    for tok in toks.values():
        with pytest.raises(ValueError, match=rf"token id {tok.vocab_size} is outside"):
            tok.decode([5, tok.vocab_size])
        assert tok.decode([tok.eos_id, tok.vocab_size]) == ""  # nothing after a stop is read


# ---------------------------------------------------------------- word alignment


def _check_alignment(tok, text, *, lossless):
    words = text.split()
    ids, index = tok.encode_with_alignment(text)
    assert ids == tok.encode(text)
    assert len(index) == len(ids)
    assert index == sorted(index), "tokens must come in word order"
    assert set(index) == set(range(len(words))) or (not words and set(index) <= {-1})
    if lossless:
        for w, word in enumerate(words):
            assert tok.decode([i for i, k in zip(ids, index) if k == w]).strip() == word
    return ids, index


@pytest.mark.parametrize("name", CASES)
def test_alignment_on_captions(name, toks):
    tok = toks[name]
    lossless = CASES[name][2]
    for text in CAPTIONS:
        # Caption characters are all in the vocabulary, so every word decodes back exactly.
        _check_alignment(tok, text, lossless=True)
    for text in OOV_CAPTIONS + MESSY:
        _check_alignment(tok, text, lossless=lossless)
    ids, index = tok.encode_with_alignment(CAPTIONS[0], add_eos=True,
                                           add_bos=tok.bos_id is not None)
    assert index[-1] == -1 and ids[-1] == tok.eos_id
    assert (index[0] == -1 and ids[0] == tok.bos_id) or tok.bos_id is None


@pytest.mark.parametrize("name", CASES)
def test_alignment_agrees_with_per_word_reference(name, toks):
    """Where tokenization never crosses a single space, encoding the caption equals encoding
    its words one by one (with the space before each word where the family attaches it)."""
    tok = toks[name]
    space_prefix = CASES[name][1]
    for text in CAPTIONS + OOV_CAPTIONS:
        ref_ids, ref_index = [], []
        for w, word in enumerate(text.split()):
            piece = tok.encode(" " + word if space_prefix and w else word)
            ref_ids += piece
            ref_index += [w] * len(piece)
        assert tok.encode_with_alignment(text) == (ref_ids, ref_index), text


def test_t5_unknown_characters_align_to_their_word(toks):
    tok = toks["t5"]
    text = OOV_CAPTIONS[0]
    ids, index = _check_alignment(tok, text, lossless=False)
    words = text.split()
    unk_words = {words[k] for i, k in zip(ids, index) if i == 2}
    known = set("".join(CORPUS))
    assert unk_words == {w for w in words if not set(w) <= known}
    assert {"☃", "🙂", "日本語"} <= unk_words


def test_lone_space_and_byte_pieces_follow_the_documented_rule(files, toks):
    # SentencePiece: '▁' then byte pieces (leading ones have empty spans) for an unknown char.
    tok = toks["llama2"]
    text = "a ☃ b"
    ids, index = tok.encode_with_alignment(text)
    pieces = spm.SentencePieceProcessor(model_file=str(files["llama2"])).id_to_piece(ids)
    assert pieces[-5:] == ["▁", "<0xE2>", "<0x98>", "<0x83>", "▁b"]
    assert index == [0, 1, 1, 1, 1, 2]
    # Byte-level BPE: a lone 'Ġ' between two spaces goes to the next word, trailing to the last.
    tok = toks["llama3"]
    text = "a  b "
    ids, index = tok.encode_with_alignment(text)
    backend = RustTokenizer.from_file(str(files["llama3"]))
    assert [backend.id_to_token(i) for i in ids] == ["a", "Ġ", "Ġb", "Ġ"]
    assert index == [0, 1, 1, 1]


def test_align_to_words_rule():
    text = "a  bc d "  # words a (0,1), bc (3,5), d (6,7)
    offsets = [(0, 0), (0, 1), (1, 2), (2, 4), (3, 3), (4, 5), (5, 7), (7, 8), (0, 4), (6, 7)]
    special = [False] * 9 + [True]
    assert align_to_words(text, offsets, special) == [0, 0, 1, 1, 1, 1, 2, 2, 0, -1]
    assert align_to_words("", [(0, 0)], [False]) == [-1]
    assert align_to_words("   ", [(0, 3)], [False]) == [-1]
    odd = "a\xa0b\u3000c\x1cd e\u200bf\tg\r\nh"
    assert [odd[s:e] for s, e in word_spans(odd)] == odd.split()


def test_token_crossing_a_space_goes_to_the_first_word(tmp_path):
    """With a piece that spans a space, the swallowed word gets no token (documented rule)."""
    tok = RustTokenizer(models.Unigram([("<unk>", 0.0), ("</s>", 0.0), ("a", -2.0), ("b", -2.0),
                                        (" ", -2.0), ("a b", -1.0)], unk_id=0, byte_fallback=False))
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (None, 1, 1)  # eos from the template
    ids, index = ours.encode_with_alignment("a b a", add_eos=True)
    assert ids == [5, 4, 2, 1]  # "a b", " ", "a", </s>
    assert index == [0, 2, 2, -1]


# ---------------------------------------------------------------- loading and errors


def test_load_tokenizer_picks_the_backend(files, tmp_path):
    assert isinstance(load_tokenizer(files["t5"].parent), SentencePieceTokenizer)  # spiece.model
    assert isinstance(load_tokenizer(files["gemma_json"].parent), HFTokenizer)
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(files["gemma"], both / "tokenizer.model")
    shutil.copy(files["gemma_json"], both / "tokenizer.json")
    assert isinstance(load_tokenizer(both), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(str(files["llama3"])), HFTokenizer)


def _raises(error, path, message):
    """``pytest.raises`` for a message that starts with the offending file's path."""
    return pytest.raises(error, match=re.escape(f"{path}: {message}"))


def test_bad_files_raise_errors_naming_the_path(tmp_path):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01 certainly not a model")
    with _raises(TokenizerFileError, garbage, "not a SentencePiece model"):
        load_tokenizer(garbage)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.model"))):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.json"))):
        load_tokenizer(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with _raises(TokenizerFileError, broken, "unreadable JSON"):
        load_tokenizer(broken)
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    with _raises(TokenizerFileError, other, "not a Hugging Face tokenizer.json"):
        load_tokenizer(other)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\n")
    with _raises(ValueError, vocab, "unknown tokenizer file type"):
        load_tokenizer(vocab)
    empty = tmp_path / "empty"
    empty.mkdir()
    with _raises(FileNotFoundError, empty, "directory holds none of"):
        load_tokenizer(empty)
    no_eos = _train_spm(tmp_path / "no_eos" / "tokenizer.model", model_type="unigram",
                        vocab_size=100, eos_id=-1)
    with _raises(TokenizerFileError, no_eos, "the SentencePiece model defines no eos piece"):
        load_tokenizer(no_eos)


def test_bad_roles_raise_errors_naming_the_file(files, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(files["llama3"], bad / "tokenizer.json")
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with _raises(TokenizerFileError, bad / "tokenizer_config.json",
                 "eos_token '<|im_end|>' is not in the vocabulary"):
        load_tokenizer(bad)
    with _raises(TokenizerFileError, "the pad_token argument", "pad_token '[PAD]' is not in"):
        HFTokenizer(files["llama3"], pad_token="[PAD]")
    nameless = tmp_path / "nameless.json"
    RustTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(nameless))
    with _raises(TokenizerFileError, nameless, "cannot tell the eos token"):
        load_tokenizer(nameless)
