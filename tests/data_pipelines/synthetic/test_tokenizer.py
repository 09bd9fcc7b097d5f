"""The synthetic scenes' tokenizer: trained on the training images' texts and the task prompts,
read by the project's SentencePiece reader with T5's special ids."""

import pytest

from data_pipelines.synthetic import dataset, tokenizer
from data_pipelines.synthetic.language import region_phrase
from pixelllm import tasks
from pixelllm.language.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def images():
    return dataset.generate(num_images=30, seed=1, height=64, width=64, min_objects=2,
                            max_objects=4)


@pytest.fixture(scope="module")
def spiece(images, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / tokenizer.TOKENIZER_FILE
    path.write_bytes(tokenizer.train(tokenizer.texts(
        [image for image in images if image.split == "train"])))
    return load_tokenizer(str(path))


def test_special_ids_are_t5s(spiece):
    assert (spiece.pad_id, spiece.eos_id, spiece.bos_id) == (0, 1, None)
    assert spiece.vocab_size <= tokenizer.DEFAULT_VOCAB_SIZE


def test_the_corpus_holds_every_text_of_the_training_images_and_every_prompt(images):
    train = [image for image in images if image.split == "train"]
    corpus = tokenizer.texts(train)
    for image in train:
        assert image.narration.caption in corpus
        assert all(region_phrase(obj) in corpus for obj in image.scene.objects)
        assert all(e in corpus for per_object in image.expressions for e in per_object)
    held_out = [image for image in images if image.split != "train"]
    assert not any(image.narration.caption in corpus for image in held_out)
    assert "where is " in corpus and "A long image caption: " in corpus


def test_every_word_is_one_piece_and_nothing_is_unknown(images, spiece):
    # A word model: one token per whitespace-separated word, so the word-trace alignment is
    # one token per word; held-out texts use no word outside the training vocabulary.
    unknown = 2  # T5's unk id, set by tokenizer.train
    texts = [image.narration.caption for image in images]
    texts += [e for image in images for per_object in image.expressions for e in per_object]
    texts += [prompt.format(expression="the small red circle", question="")
              for task in tasks.TASKS.values() for prompt in task.prompts]
    for text in texts:
        ids = spiece.encode(text)
        assert len(ids) == len(text.split()), text
        assert unknown not in ids, text
        assert spiece.decode(ids) == " ".join(text.split())


def test_the_same_texts_give_the_same_bytes(images):
    corpus = tokenizer.texts(images)
    assert tokenizer.train(corpus) == tokenizer.train(corpus)
