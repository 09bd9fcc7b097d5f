"""Synthetic scenes (data_pipelines/synthetic) written in the public formats and read back by the
real builders: Localized Narratives (coco), RefCOCO (refcoco_unc), Visual Genome (densecap)."""

import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from pycocotools import mask as coco_mask

from data_pipelines import synthetic_scenes
from data_pipelines.alignment import NarrativeTraces, align
from data_pipelines.builders import localized_narratives, refcoco, visual_genome
from data_pipelines.synthetic import dataset, formats, language, scenes

SIZE = 64
NUM_IMAGES = 8
SEED = 3
# Builder split names of each source for the generator's splits.
LN_SPLITS = {"train": "train", "val": "validation"}
BUILDERS = {
    "ln": (localized_narratives.LocalizedNarratives, formats.LN_DIR, "coco"),
    "refer": (refcoco.ReferCoco, formats.REFER_DIR, "refcoco_unc"),
    "vg": (visual_genome.VgDensecap, formats.VG_DIR, "densecap"),
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    images = dataset.generate(num_images=NUM_IMAGES, seed=SEED, height=SIZE, width=SIZE,
                              min_objects=2, max_objects=4, val_fraction=0.25,
                              test_fraction=0.25)
    formats.write_all(images, str(out))
    return {image.image_id: image for image in images}, out


@pytest.fixture(scope="module")
def built(generated, tmp_path_factory):
    """Source -> (builder, {split: {image id: example}}), each builder run once."""
    _, out = generated
    result = {}
    for source, (builder_class, folder, config) in BUILDERS.items():
        builder = builder_class(config=config, skip_policy="fail",
                                data_dir=tmp_path_factory.mktemp(f"tfds_{source}"))
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=str(out / folder)))
        by_split = {}
        for split, data_source in builder.as_data_source().items():
            examples = [data_source[i] for i in range(len(data_source))]
            by_split[split] = {int(e["image/id"]): e for e in examples}
        result[source] = builder, by_split
    return result


def _ids(images, split):
    return sorted(i for i, image in images.items() if image.split == split)


def test_splits_are_disjoint_and_consistent_across_sources(generated, built):
    images, _ = generated
    assert {split: len(_ids(images, split)) for split in dataset.SPLITS} == {
        "train": 4, "val": 2, "test": 2}
    for source, (builder, by_split) in built.items():
        assert all(sum(counts.values()) == 0 for counts in builder.skip_counts.values()), source
        seen = [i for examples in by_split.values() for i in examples]
        assert len(seen) == len(set(seen)), source
    ln = built["ln"][1]
    assert set(ln) == {"train", "validation"}  # Localized Narratives has no COCO test split
    for split, ln_split in LN_SPLITS.items():
        assert sorted(ln[ln_split]) == _ids(images, split)
    for source in ("refer", "vg"):
        assert {split: sorted(examples) for split, examples in built[source][1].items()} == {
            split: _ids(images, split) for split in dataset.SPLITS}, source


def _normalized_box(obj):
    return np.array(obj.box, np.float32) / SIZE


def test_refcoco_masks_and_boxes_are_the_visible_shapes(generated, built):
    images, _ = generated
    for examples in built["refer"][1].values():
        for image_id, example in examples.items():
            objects = images[image_id].scene.objects
            for ann_id, box, mask in zip(example["objects"]["id"], example["objects"]["box"],
                                         example["objects"]["mask"]):
                obj = objects[int(ann_id) % 1000]
                np.testing.assert_array_equal(mask[..., 0] > 0, obj.mask)
                rows, cols = np.nonzero(obj.mask)
                tight = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / SIZE
                np.testing.assert_allclose(box, tight, atol=1e-6)


_SUPERLATIVE = {
    "biggest": lambda o: o.radius, "smallest": lambda o: -o.radius,
    "leftmost": lambda o: -(o.box[0] + o.box[2]), "rightmost": lambda o: o.box[0] + o.box[2],
    "topmost": lambda o: -(o.box[1] + o.box[3]), "lowest": lambda o: o.box[1] + o.box[3],
}
_EXPRESSION = re.compile(
    rf"the (?:({'|'.join(_SUPERLATIVE)}) )?(?:({'|'.join(scenes.SIZES)}) )?"
    rf"(?:({'|'.join(scenes.COLOURS)}) )?({'|'.join(scenes.SHAPES)}|shape)"
    rf"(?: ({'|'.join(language.RELATIONS)}) (the .+))?")


def _resolve(text, objects):
    """The shapes ``text`` can mean, read from the words alone."""
    match = _EXPRESSION.fullmatch(text)
    assert match, text
    superlative, size, colour, shape, relation, landmark = match.groups()
    found = [o for o in objects
             if (size is None or o.size == size) and (colour is None or o.colour == colour)
             and (shape == "shape" or o.shape == shape)]
    if relation:
        landmarks = _resolve(landmark, objects)
        assert len(landmarks) == 1, (text, landmark)
        found = [o for o in found if language.RELATIONS[relation](o, landmarks[0])]
    if superlative:
        best = max(_SUPERLATIVE[superlative](o) for o in found)
        found = [o for o in found if _SUPERLATIVE[superlative](o) == best]
    return found


def test_every_expression_names_exactly_its_object(generated, built):
    images, _ = generated
    num_expressions = 0
    kinds = set()
    for examples in built["refer"][1].values():
        for image_id, example in examples.items():
            objects = images[image_id].scene.objects
            ann_ids = example["objects"]["id"]
            for index, text in zip(example["expressions"]["object"],
                                   example["expressions"]["text"]):
                target = objects[int(ann_ids[index]) % 1000]
                assert _resolve(text.decode(), objects) == [target], text
                num_expressions += 1
                kinds.add(("relation" if " the " in text.decode()[4:] else "superlative"
                           if text.decode().split()[1] in _SUPERLATIVE else "attributes"))
    assert num_expressions >= 2 * NUM_IMAGES
    assert kinds == {"relation", "superlative", "attributes"}


def test_trace_of_each_word_lies_on_the_object_it_names(generated, built):
    images, _ = generated
    tolerance = 1.5 / SIZE  # hand tremor
    for method, required in (("exact", 0.95), ("official", 0.6)):
        hits = total = 0
        for examples in built["ln"][1].values():
            for image_id, example in examples.items():
                image = images[image_id]
                traces = NarrativeTraces.from_example(example, narrative=0)
                words = traces.caption.split()
                points, mask = align(traces, word_index=np.arange(len(words)), method=method)
                word_objects = [u.object_index for u in image.narration.utterances
                                for _ in u.text.split()]
                assert len(word_objects) == len(words)
                for word_points, has_target, index in zip(points, mask, word_objects):
                    box = _normalized_box(image.scene.objects[index])
                    total += 1
                    hits += bool(has_target and np.all(word_points >= box[:2] - tolerance)
                                 and np.all(word_points <= box[2:] + tolerance))
        assert hits >= required * total, (method, hits, total)


def test_visual_genome_regions_are_the_objects(generated, built):
    images, _ = generated
    for examples in built["vg"][1].values():
        for image_id, example in examples.items():
            objects = images[image_id].scene.objects
            assert len(example["objects"]["id"]) == len(objects)
            for obj, box, phrase in zip(objects, example["objects"]["box"],
                                        example["objects"]["phrase"]):
                np.testing.assert_allclose(box, _normalized_box(obj), atol=1e-6)
                assert phrase.decode() == language.region_phrase(obj)


def test_mask_polygons_render_exactly_the_mask():
    rng = np.random.default_rng(0)
    mask = rng.random((9, 11)) < 0.5  # holes, islands and diagonal touches
    mask[3:6, 3:8] = True
    mask[4, 5] = False
    polygons = formats.mask_polygons(mask)
    rendered = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygons, 9, 11)))
    np.testing.assert_array_equal(rendered.astype(bool), mask)


def _tree(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def test_command_line_is_deterministic(tmp_path, capsys):
    def run(out, seed):
        synthetic_scenes.main(["--out", str(out), "--num_images", "4", "--seed", str(seed),
                               "--height", "32", "--width", "40"])
        return _tree(out)

    first = run(tmp_path / "a", seed=5)
    printed = capsys.readouterr().out
    assert "4 images of 32x40 px (seed 5)" in printed
    assert str(tmp_path / "a" / formats.REFER_DIR) in printed
    assert "refer/refcoco/refs(unc).p" in first
    assert "visual_genome/densecap_splits.json" in first
    assert run(tmp_path / "b", seed=5) == first
    other = run(tmp_path / "c", seed=6)
    assert other != first
