"""TFDS builders for the data sets PixelLLM trains and evaluates on.

Every builder is a manual-download ``GeneratorBasedBuilder`` written as ``array_record`` (read
with ``builder.as_data_source()``, no TensorFlow). Importing a module registers its builder:

==================================  ======================  ===================================
module                              builder name            configs
==================================  ======================  ===================================
:mod:`.localized_narratives`        ``localized_narratives``  ``coco`` (one example per image,
                                                            every annotator's narrative and
                                                            per-utterance mouse traces)
:mod:`.refcoco`                     ``refer_coco``          ``refcoco_unc``, ``refcoco_google``,
                                                            ``refcocoplus_unc``,
                                                            ``refcocog_google``, ``refcocog_umd``
:mod:`.visual_genome`               ``vg_densecap``         ``densecap``, ``grit``
:mod:`.coco_captions`               ``coco_captions_manual``  ``coco`` (2017 train/val and
                                                            Karpathy's split, every caption)
:mod:`.llava_instructions`          ``llava_instructions``  ``llava_v1_5_mix665k``,
                                                            ``sharegpt4v_mix665k``
:mod:`.referring_mixture`          ``referring_mixture``   ``uni_flickr``, ``uni_mixed_coco``,
                                                            ``uni_mixed_vg`` (SeqTR files),
                                                            ``merge_coco_img_safe`` (MDETR)
:mod:`.reason_seg`                  ``reason_seg``          ``reason_seg`` (LISA's ReasonSeg:
                                                            queries, 0/1/255 mask, explanations)
:mod:`.panoptic_narrative_grounding`                        ``png_coco`` (F-LMM's layout:
  builder ``panoptic_narrative_grounding``                  narratives, one mask per phrase)
==================================  ======================  ===================================

Conventions shared by all: coordinates normalized to the stored image, x first, boxes
``(x0, y0, x1, y1)`` in [0, 1]; every example has ``image`` (uint8 RGB, stored frame:
see :mod:`data_pipelines.images`), ``image/id``, ``image/filename``, ``image/height`` and
``image/width``; bad records are skipped and counted or refused (``skip_policy``, see
:mod:`data_pipelines.skips`). These shared parts live in :mod:`.common`.
"""
