"""Preprocessing ops: pure functions ``op(example, rng) -> example`` made by registered
factories and named in configs by op specs (see :mod:`.registry`).

Importing this package registers every op:

======================  ==================================================================
``decode``              builder example -> working example (:mod:`.decode`, :mod:`.fields`)
``evaluation_metadata`` the image id and original size, for evaluation (after ``decode``)
``task_prompt``         the task prompts as text (the rows of :mod:`pixelllm.tasks`)
``horizontal_flip``     random mirror, "left"/"right" swapped or sided texts not flipped
``random_scale_crop``   scale jitter + random crop onto the canvas (training)
``resize_and_pad``      aspect-preserving resize onto the canvas (evaluation)
``sam_features``        the geometry ops with K fixed draws per image, plus the canvas's
                        cached SAM features (the SAM feature cache switch)
``slot``                the task's S caption slots and G ground-truth objects
``tokenize``            slot texts -> context/text tokens and per-token trace targets
======================  ==================================================================

A typical chain: ``decode|task_prompt(...)|horizontal_flip(...)|random_scale_crop(...)|
slot(...)|tokenize(...)``.
"""

from data_pipelines.ops import (decode, evaluation_metadata, horizontal_flip,
                                random_scale_crop, registry, resize_and_pad, sam_features, slot,
                                task_prompt, tokenize)

__all__ = ["decode", "evaluation_metadata", "horizontal_flip", "random_scale_crop", "registry",
           "resize_and_pad", "sam_features", "slot", "task_prompt", "tokenize"]
