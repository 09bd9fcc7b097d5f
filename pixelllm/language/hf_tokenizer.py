"""Hugging Face ``tokenizer.json`` files (Llama 3, Gemma 3), read with the ``tokenizers`` library.

A ``tokenizer.json`` lists special tokens but not their roles, so bos/eos/pad are resolved per
role, first match wins:

1. the ``bos_token`` / ``eos_token`` / ``pad_token`` arguments;
2. ``tokenizer_config.json``, then ``special_tokens_map.json``, next to the file;
3. (bos, eos) the post-processor template: the special token before ``$A`` is bos (Llama 3
   ``<|begin_of_text|> $A``), the one after it eos (T5 ``$A </s>``);
4. the usual names, if in the vocabulary: bos ``<|begin_of_text|>``, ``<bos>``, ``<s>``; eos
   ``<|end_of_text|>``, ``<eos>``, ``</s>``; pad ``<pad>``, ``<|finetune_right_pad_id|>``
   (torchtune's Llama 3 pad).

Without a pad token, pad is eos; without an eos token, loading fails. ``generation_config.json``
next to the file may add stop ids (its ``eos_token_id``, e.g. Llama 3 Instruct's ``<|eot_id|>``).
Special tokens written in the text are matched as special tokens, as in ``transformers``. The
model's unknown token is text, not special: it is aligned to its word and decoded as itself.
"""

from __future__ import annotations

import json
import os

import tokenizers

from pixelllm.language.tokenizer import Tokenizer, TokenizerFileError

_ROLE_NAMES = {
    "bos_token": ("<|begin_of_text|>", "<bos>", "<s>"),
    "eos_token": ("<|end_of_text|>", "<eos>", "</s>"),
    "pad_token": ("<pad>", "<|finetune_right_pad_id|>"),
}


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerFileError(f"{path}: unreadable JSON ({e})") from e


def _configured_tokens(directory: str) -> dict[str, tuple[str, str]]:
    """``{role: (token, file it came from)}`` from the tokenizer config files in ``directory``."""
    found = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            continue
        config = _read_json(file)
        for role in _ROLE_NAMES:
            value = config.get(role)
            if isinstance(value, dict):  # serialized AddedToken
                value = value.get("content")
            if isinstance(value, str):
                found.setdefault(role, (value, file))
    return found


def _template_ids(post_processor) -> dict[str, int]:
    """``{"bos_token": id, "eos_token": id}`` from a TemplateProcessing ``single`` template."""
    if not post_processor:
        return {}
    processors = (post_processor.get("processors", []) if post_processor["type"] == "Sequence"
                  else [post_processor])
    for processor in processors:
        if processor["type"] != "TemplateProcessing":
            continue
        single = processor["single"]
        sequence_at = next((i for i, item in enumerate(single) if "Sequence" in item), None)
        if sequence_at is None:
            return {}
        before = [item["SpecialToken"]["id"] for item in single[:sequence_at]
                  if "SpecialToken" in item]
        after = [item["SpecialToken"]["id"] for item in single[sequence_at + 1:]
                 if "SpecialToken" in item]
        roles = {}
        for role, names in (("bos_token", before), ("eos_token", after)):
            if names:
                ids = processor["special_tokens"][names[0]]["ids"]
                if len(ids) == 1:
                    roles[role] = ids[0]
        return roles
    return {}


def _unknown_id(model: dict, backend: tokenizers.Tokenizer) -> int | None:
    if model.get("unk_id") is not None:  # Unigram
        return model["unk_id"]
    if model.get("unk_token") is not None:  # BPE, WordPiece, WordLevel
        return backend.token_to_id(model["unk_token"])
    return None


def _extra_stop_ids(directory: str) -> list[int]:
    file = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(file):
        return []
    value = _read_json(file).get("eos_token_id")
    return [] if value is None else [value] if isinstance(value, int) else list(value)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` behind the :class:`Tokenizer` interface.

    Args:
      tokenizer_json_path: the ``tokenizer.json`` file.
      bos_token, eos_token, pad_token: token strings that override the roles found in the files.
    """

    def __init__(self, tokenizer_json_path: str | os.PathLike, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None):
        path = os.fspath(tokenizer_json_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        spec = _read_json(path)
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust library raises a bare Exception
            raise TokenizerFileError(f"{path}: not a Hugging Face tokenizer.json ({e})") from e
        # A file may carry padding/truncation settings; encode must return the bare tokens.
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        # The model's unknown token stands for text (a converted T5 lists <unk> as special).
        unk = _unknown_id(spec.get("model") or {}, backend)
        self._special = frozenset(i for i, token in backend.get_added_tokens_decoder().items()
                                  if token.special and i != unk)

        directory = os.path.dirname(os.path.abspath(path))
        overrides = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        configured = _configured_tokens(directory)
        template = _template_ids(spec.get("post_processor"))
        roles = {}
        for role, names in _ROLE_NAMES.items():
            if overrides[role] is not None or role in configured:
                token, source = ((overrides[role], f"the {role} argument")
                                 if overrides[role] is not None else configured[role])
                roles[role] = backend.token_to_id(token)
                if roles[role] is None:
                    raise TokenizerFileError(
                        f"{source}: {role} {token!r} is not in the vocabulary of {path}")
            elif role in template:
                roles[role] = template[role]
            else:
                roles[role] = next((backend.token_to_id(n) for n in names
                                    if backend.token_to_id(n) is not None), None)
        if roles["eos_token"] is None:
            raise TokenizerFileError(
                f"{path}: cannot tell the eos token (no tokenizer_config.json, template or usual "
                "name); pass eos_token=")
        eos = roles["eos_token"]
        # One more than the largest id, not the count of tokens, which is smaller where a file's
        # ids have gaps: every id encode can return must lie below vocab_size.
        vocab_size = 1 + max(backend.get_vocab(with_added_tokens=True).values(), default=-1)
        super().__init__(path=path, vocab_size=vocab_size,
                         bos_id=roles["bos_token"], eos_id=eos,
                         pad_id=eos if roles["pad_token"] is None else roles["pad_token"],
                         stop_ids=_extra_stop_ids(directory))

    def _encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def _encode_with_offsets(self, text):
        encoding = self._backend.encode(text, add_special_tokens=False)
        ids = encoding.ids
        return ids, encoding.offsets, [i in self._special for i in ids]

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode([i for i in ids if i not in self._special],
                                    skip_special_tokens=False)
