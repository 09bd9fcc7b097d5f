"""Fixtures shared by the builder tests: building a data set from a manual folder, reading it.

They are fixtures returning functions because the tests run with ``--import-mode=importlib``
and cannot import helpers from one another.
"""

import pytest
import tensorflow_datasets as tfds


@pytest.fixture(scope="session")
def build_dataset():
    """``build_dataset(builder_class, *, manual_dir, data_dir, **kwargs) -> builder``.

    Makes ``builder_class(data_dir=data_dir, **kwargs)`` and writes its splits as array_record
    from the files in ``manual_dir``.
    """

    def build(builder_class, *, manual_dir, data_dir, **kwargs):
        builder = builder_class(data_dir=data_dir, **kwargs)
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
        return builder

    return build


@pytest.fixture(scope="session")
def examples_by_id():
    """``examples_by_id(builder, split) -> {image id: example}``, read without TensorFlow."""

    def read(builder, split):
        source = builder.as_data_source()[split]
        examples = [source[i] for i in range(len(source))]
        return {example["image/id"].decode(): example for example in examples}

    return read
