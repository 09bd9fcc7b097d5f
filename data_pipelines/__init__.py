"""From the public data files to the model's batches.

- :mod:`data_pipelines.builders`: TFDS builders (manual download, ArrayRecord, no TensorFlow) for
  Localized Narratives, RefCOCO/+/g and Visual Genome dense captioning.
- :mod:`data_pipelines.images`, :mod:`data_pipelines.skips`: robust image reading, counted skips
  of bad records (the refer toolkit's pickles are read by
  :mod:`pixelllm.checkpoints.restricted_pickle`, without code execution).
- :mod:`data_pipelines.alignment`: word-to-trace alignment (official and exact).
- :mod:`data_pipelines.ops`: registered preprocessing ops (task prompts and slots follow the task
  table, :mod:`pixelllm.tasks`); :mod:`data_pipelines.pipeline`: weighted mixing, batching to the
  batch contract (:mod:`pixelllm.batch`), per-host sharding, resumable iterator state.
"""
