"""Writes synthetic grounded scenes as Localized Narratives, RefCOCO and Visual Genome files.

    python -m data_pipelines.synthetic_scenes --out DIR --num_images N --seed S

makes ``N`` images of coloured shapes (:mod:`data_pipelines.synthetic`) and writes
``DIR/localized_narratives``, ``DIR/refer`` and ``DIR/visual_genome``, the ``manual_dir`` of the
builders ``localized_narratives`` (config ``coco``), ``refer_coco`` (``refcoco_unc``) and
``vg_densecap`` (``densecap``); see :mod:`data_pipelines.synthetic.formats`; and
``DIR/spiece.model``, a SentencePiece tokenizer trained on the training images' texts and the
task prompts (:mod:`data_pipelines.synthetic.tokenizer`). The same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from data_pipelines.synthetic import dataset, formats, tokenizer

_BUILDERS = {
    formats.LN_DIR: "localized_narratives (config coco; val -> split 'validation')",
    formats.REFER_DIR: "refer_coco (config refcoco_unc)",
    formats.VG_DIR: "vg_densecap (config densecap)",
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num_images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--min_objects", type=int, default=3)
    parser.add_argument("--max_objects", type=int, default=6)
    parser.add_argument("--val_fraction", type=float, default=0.1)
    parser.add_argument("--test_fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    images = dataset.generate(num_images=args.num_images, seed=args.seed, height=args.height,
                              width=args.width, min_objects=args.min_objects,
                              max_objects=args.max_objects, val_fraction=args.val_fraction,
                              test_fraction=args.test_fraction)
    written = formats.write_all(images, args.out)
    tokenizer_path = os.path.join(args.out, tokenizer.TOKENIZER_FILE)
    with open(tokenizer_path, "wb") as f:
        f.write(tokenizer.train(tokenizer.texts(
            [image for image in images if image.split == "train"])))
    print(f"{len(images)} images of {args.height}x{args.width} px (seed {args.seed}) in "
          f"{time.perf_counter() - start:.1f} s:")
    for folder, counts in written.items():
        per_split = ", ".join(f"{split} {count}" for split, count in counts.items())
        print(f"  {os.path.join(args.out, folder)}: images per split: {per_split}\n"
              f"      manual_dir of {_BUILDERS[folder]}")
    num_refs = sum(bool(e) for image in images for e in image.expressions)
    num_sentences = sum(len(e) for image in images for e in image.expressions)
    print(f"  {num_refs} refs with {num_sentences} expressions; "
          f"{sum(len(image.scene.objects) for image in images)} shapes (regions)")
    print(f"  {tokenizer_path}: SentencePiece tokenizer of the training texts and task prompts")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
