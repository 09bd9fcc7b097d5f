"""The sizes a training config's model and data must agree on, checked before anything is built.

The data config declares the batch contract sizes once (``config.data.sizes``: canvas, points
per token, slots, context and text lengths, objects) and builds its op chains from them; the
model needs some of them too (``model.canvas_size`` and both encoders' input size,
``model.point_head.num_points``, caption slots for dense captioning, a decoder's context).
:func:`check` refuses any disagreement, naming both fields. ``configs/experiments/experiment.py``
runs it when it builds an experiment, and the trainer runs it again on the config it is given,
after ``--config.x=y`` overrides: an override of ``model.canvas_size`` alone, or of
``data.sizes`` alone (the op chains keep the sizes they were built with), is exactly the
mismatch it catches. The tokenizer is named once, ``config.data.tokenizer``; a ``tokenize`` op
naming another one is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Keys of a source's op entries that carry a batch-contract size under the same name.
SIZE_KEYS = ("canvas", "slots", "objects", "context_length", "text_length", "points_per_token")


def check(config: Any) -> None:
    """Raises ``ValueError`` listing every size on which the model and the data disagree."""
    problems = []
    model, data = config.model, config.data
    sizes = data.sizes

    def agree(model_field: str, model_value: Any, data_field: str, data_value: Any):
        if model_value != data_value:
            problems.append(f"{model_field} {model_value!r} != {data_field} {data_value!r}")

    agree("model.canvas_size", model.canvas_size, "data.sizes.canvas", sizes.canvas)
    agree("model.sam.image_encoder.img_size", model.sam.image_encoder.img_size,
          "data.sizes.canvas", sizes.canvas)
    agree("model.eva02.img_size", model.eva02.img_size, "data.sizes.canvas", sizes.canvas)
    agree("model.point_head.num_points", model.point_head.num_points,
          "data.sizes.points_per_token", sizes.points_per_token)
    # Dense captioning writes its matched proposals into the batch's slots.
    if model.dense_captioning.num_text_proposals > sizes.slots:
        problems.append(f"model.dense_captioning.num_text_proposals {model.dense_captioning.num_text_proposals} "
                        f"> data.sizes.slots {sizes.slots}")
    problems += _decoder_context_problems(model, sizes)
    for group in ("train", "eval"):
        for index, source in enumerate(data[group]):
            # Evaluation sources carry their own sizes (more slots); the rest use data.sizes.
            own = "sizes" in source
            source_sizes = source["sizes"] if own else sizes
            where = f"data.{group}[{index}] ({source['name']})"
            if own:
                for key in ("canvas", "points_per_token", "context_length", "text_length"):
                    if source_sizes[key] != sizes[key]:
                        problems.append(f"{where}.sizes.{key} {source_sizes[key]!r} != "
                                        f"data.sizes.{key} {sizes[key]!r}")
            problems += _op_problems(where, source["ops"], source_sizes,
                                     "its sizes" if own else "data.sizes", data.tokenizer)
    if problems:
        raise ValueError(f"experiment {config.model_variant!r} + data {config.data_variant!r}: "
                         "model and data sizes disagree:\n  " + "\n  ".join(problems))


def _decoder_context_problems(model: Any, sizes: Mapping) -> list[str]:
    """A decoder LM reads [visual tokens | context | text] as one sequence; T5 has no limit."""
    language_model = model.language_model
    if language_model.kind != "decoder":
        return []
    length = model.prompt_adapter.num_queries + sizes.context_length + sizes.text_length
    limit = language_model.model.max_position_embeddings
    if length > limit:
        return [f"model.prompt_adapter.num_queries + data.sizes.context_length + "
                f"data.sizes.text_length = {length} > "
                f"model.language_model.model.max_position_embeddings {limit}"]
    return []


def _op_problems(where: str, ops: list[Mapping], sizes: Mapping, sizes_name: str,
                 tokenizer: str | None) -> list[str]:
    problems = []
    for index, op in enumerate(ops):
        for key in SIZE_KEYS:
            if key in op and op[key] != sizes[key]:
                problems.append(f"{where}.ops[{index}] ({op['op']}) {key} {op[key]!r} != "
                                f"{sizes_name}.{key} {sizes[key]!r}")
        if op["op"] == "tokenize" and op.get("tokenizer") not in (None, tokenizer):
            problems.append(f"{where}.ops[{index}] (tokenize) tokenizer {op['tokenizer']!r} != "
                            f"data.tokenizer {tokenizer!r}")
    return problems
