"""Synthetic grounded scenes written in the public data set formats.

Images of coloured shapes on textured, noisy backgrounds (:mod:`.scenes`), described by
narratives with mouse traces (:mod:`.narratives`), referring expressions and region phrases
(:mod:`.language`), and written as Localized Narratives, refer-toolkit and Visual Genome files
(:mod:`.formats`) that the real builders of :mod:`data_pipelines.builders` read. The command
line is :mod:`data_pipelines.synthetic_scenes`.
"""
