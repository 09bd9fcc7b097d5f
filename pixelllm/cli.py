"""The ``pixelllm`` command: every task of :class:`pixelllm.predictor.Predictor` on image files
and folders, writing a JSON result and a PNG overlay per image.

    pixelllm caption  PHOTO_OR_FOLDER... --workdir=RUN --out=OUT [--prompt=TEXT]
    pixelllm locate   ... --expression=TEXT        pixelllm segment ... --expression=TEXT
    pixelllm describe ... --box=X0,Y0,X1,Y1 | --points="X,Y X,Y"
    pixelllm dense    ...                          pixelllm answer  ... --question=TEXT
    pixelllm serve    [--workdir=RUN | --config=...] [--host=127.0.0.1] [--port=8000]

The model: ``--workdir`` (a training run, its latest checkpoint) or ``--config=FILE[:VARIANT]``
(an experiment or stage config, ``.py`` or a run's ``config.json``) with the public files
``--sam``, ``--eva02``, ``--language_model`` and ``--tokenizer``. Images (JPEG, PNG, WebP, any
mode) are read as displayed (EXIF orientation applied); every coordinate, in and out, is in
that upright frame. A folder is searched recursively for those suffixes.

For ``OUT/<name>.json`` (``image``, ``width``, ``height``, ``task``, ``model``, ``result``) and
``OUT/<name>.png``, ``<name>`` is a file's stem, or a folder member's path inside the folder
without its suffix, ``/`` written ``__`` (a name seen twice gets ``-2``, ``-3``...).

``pixelllm serve`` starts the local web app of :mod:`pixelllm.web` on the model (by default
the demo's, ``demo_out/run``) and serves until interrupted.

Exit status: 0 when every image was processed; 1 when any input was skipped (an unreadable or
missing image, a box outside it: each named on one line, the rest still processed, the count
printed), when no image was found, or when the model cannot be loaded or cannot run the task;
2 for a usage error (an unknown flag, empty text, a malformed box). Configs and
``data_pipelines`` are read from the repository root, so run the command there (as every
command of the README).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TASKS = ("caption", "locate", "segment", "describe", "dense", "answer")
# The work dir `bash launch/demo.sh` trains: what `pixelllm serve` serves by default.
DEMO_WORKDIR = "demo_out/run"


class UsageError(Exception):
    """A command line that cannot run; the message is printed on one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def _text(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("empty text")
    return value


def _numbers(value: str, count: int | None = None) -> list[float]:
    try:
        numbers = [float(v) for v in value.replace(",", " ").split()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{value!r} is not a list of numbers") from error
    if not numbers or (count is not None and len(numbers) != count):
        raise argparse.ArgumentTypeError(f"{value!r}: expected {count or 'some'} numbers")
    return numbers


def _box(value: str) -> list[float]:
    return _numbers(value, 4)


def _points(value: str) -> list[list[float]]:
    numbers = _numbers(value)
    if len(numbers) % 2:
        raise argparse.ArgumentTypeError(f"{value!r}: points are x,y pairs")
    return [numbers[i:i + 2] for i in range(0, len(numbers), 2)]


def _power_of_two(value: str) -> int:
    number = int(value)
    if number < 1 or number & (number - 1):
        raise argparse.ArgumentTypeError(f"{value} is not a power of two")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The command's parser: one subcommand per task."""
    model = _Parser(add_help=False)
    model.add_argument("--workdir", help="a training run's work dir (latest checkpoint)")
    model.add_argument("--config", help="FILE[:VARIANT]: an experiment or stage config (.py), "
                       "or a run's config.json; with the public files below")
    for name in ("sam", "eva02", "language_model", "tokenizer"):
        model.add_argument(f"--{name}", help=f"with --config: the public {name} file or folder")
    model.add_argument("--max_new_tokens", type=int,
                       help="generated length limit (default: the run's text length - 1)")
    common = _Parser(add_help=False, parents=[model])
    common.add_argument("inputs", nargs="+", help="image files and folders")
    common.add_argument("--out", required=True, help="folder for the JSON and PNG files")
    common.add_argument("--batch_size", type=_power_of_two, default=8,
                        help="images run at once (a power of two)")
    common.add_argument("--beam_size", type=int, default=1, help="1: greedy (official)")
    parser = _Parser(prog="pixelllm", description="PixelLLM on your images.")
    commands = parser.add_subparsers(dest="task", required=True)
    caption = commands.add_parser("caption", parents=[common], help="caption with word traces")
    caption.add_argument("--prompt", type=_text, help="default: the trace task's prompt")
    for task in ("locate", "segment"):
        commands.add_parser(task, parents=[common], help=f"{task} a referring expression") \
            .add_argument("--expression", type=_text, required=True)
    describe = commands.add_parser("describe", parents=[common], help="caption a region")
    region = describe.add_mutually_exclusive_group(required=True)
    region.add_argument("--box", type=_box, help="x0,y0,x1,y1 in image pixels")
    region.add_argument("--points", type=_points, help="'x,y x,y ...' in image pixels")
    commands.add_parser("dense", parents=[common], help="dense captioning")
    commands.add_parser("answer", parents=[common], help="answer a question") \
        .add_argument("--question", type=_text, required=True)
    serve = commands.add_parser("serve", parents=[model], help="a local web app for every task "
                                f"(default model: --workdir={DEMO_WORKDIR})")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port")
    serve.add_argument("--examples", help="folder of example images (default: the demo's "
                       "held-out images beside the work dir, else generated scenes)")
    # One image per request: one compiled program per task.
    serve.set_defaults(batch_size=1)
    return parser


def _load_config(spec: str):
    """``FILE[:VARIANT]``: a config file's ``get_config(VARIANT)``, or a ``.json`` config."""
    import ml_collections

    path, _, variant = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    if path.endswith(".json"):
        return ml_collections.ConfigDict(json.loads(Path(path).read_text()))
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def _predictor(args: argparse.Namespace):
    from pixelllm.predictor import Predictor

    options = {"max_batch": args.batch_size}
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    if args.workdir:
        return Predictor.from_workdir(args.workdir, **options)
    return Predictor.from_pretrained(_load_config(args.config), sam=args.sam, eva02=args.eva02,
                                     language_model=args.language_model,
                                     tokenizer=args.tokenizer, **options)


def _inputs(paths: Sequence[str]) -> list[tuple[Path, str]]:
    """``[(file, output name)]``: files as given, folders' images recursively, in order."""
    found, taken = [], {}
    for given in paths:
        path = Path(given)
        if path.is_dir():
            members = sorted(p for p in path.rglob("*")
                             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            items = [(p, p.relative_to(path).with_suffix("").as_posix().replace("/", "__"))
                     for p in members]
        else:
            items = [(path, path.stem)]
        for file, name in items:
            taken[name] = taken.get(name, 0) + 1
            found.append((file, name if taken[name] == 1 else f"{name}-{taken[name]}"))
    return found


def _run_task(predictor, args: argparse.Namespace, images: list[np.ndarray]) -> list[Any]:
    settings = predictor.settings._replace(beam_size=args.beam_size)
    count = len(images)
    runs: dict[str, Callable[[], list[Any]]] = {
        "caption": lambda: predictor.caption(
            images, settings=settings,
            **({"prompt": args.prompt} if args.prompt else {})),
        "locate": lambda: predictor.locate(images, [args.expression] * count),
        "segment": lambda: predictor.segment(images, [args.expression] * count),
        "describe": lambda: predictor.describe_region(
            images, boxes=None if args.box is None else [args.box] * count,
            points=None if args.points is None else [args.points] * count, settings=settings),
        "dense": lambda: predictor.dense_caption(images, settings=settings),
        "answer": lambda: predictor.answer(images, [args.question] * count, settings=settings),
    }
    return runs[args.task]()


def _check_region(args: argparse.Namespace, image: np.ndarray, name: str) -> None:
    """Raises ``ValueError`` naming the image when the region prompt leaves it."""
    from pixelllm.predictor import check_box, check_points

    height, width = image.shape[:2]
    if args.task == "describe" and args.box is not None:
        check_box(args.box, width=width, height=height, name=f"{name}: --box")
    if args.task == "describe" and args.points is not None:
        check_points(args.points, width=width, height=height, name=f"{name}: --points")


def _serve(args: argparse.Namespace) -> int:
    """``pixelllm serve``: loads the model once, then serves until interrupted."""
    from pixelllm.web import examples, server

    try:
        predictor = _predictor(args)
        folder = (Path(args.examples) if args.examples else
                  Path(args.workdir).parent / "images" if args.workdir else None)
        app = server.DemoServer((args.host, args.port), predictor=predictor,
                                model_name=args.workdir or args.config,
                                examples=examples.load(folder, count=6))
    except (OSError, ValueError) as error:
        hint = ("; train it with `bash launch/demo.sh` or pass --workdir"
                if args.workdir == DEMO_WORKDIR else "")
        print(f"pixelllm: error: cannot serve: {error}{hint}", file=sys.stderr)
        return 1
    # The page offers every mode; a mode this model cannot run answers with this message.
    from pixelllm.models.pixel_llm.inference import missing_message
    for task, modules in predictor.unavailable.items():
        print(f"pixelllm: note: {missing_message(task, modules)}", file=sys.stderr)
    server.serve(app)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command (``argv`` without the program name); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.task == "serve" and not args.workdir and not args.config:
            args.workdir = DEMO_WORKDIR
        if bool(args.workdir) == bool(args.config):
            raise UsageError("give exactly one of --workdir and --config")
    except UsageError as error:
        print(f"pixelllm: error: {error}", file=sys.stderr)
        return 2
    # The library reads data_pipelines/ from the repository root, the working directory (a
    # console script's sys.path holds its own folder instead, unlike `python -m`).
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        from data_pipelines.images import ImageError, read_upright_photo
    except ModuleNotFoundError:
        print(f"pixelllm: error: no data_pipelines/ in {os.getcwd()}: run the command from the "
              "repository root", file=sys.stderr)
        return 2
    if args.task == "serve":
        return _serve(args)
    from tqdm import tqdm

    from pixelllm import overlay

    items = _inputs(args.inputs)
    try:
        predictor = _predictor(args)
    except (OSError, ValueError) as error:
        print(f"pixelllm: error: cannot load the model: {error}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = args.workdir or args.config
    skipped = 0
    with tqdm(total=len(items), unit="image", disable=len(items) < 2, file=sys.stderr) as bar:
        for start in range(0, len(items), args.batch_size):
            batch = []
            for path, name in items[start:start + args.batch_size]:
                try:
                    image = read_upright_photo(path, name=str(path))
                    _check_region(args, image, str(path))
                    batch.append((path, name, image))
                except (ImageError, ValueError) as error:
                    skipped += 1
                    bar.write(f"pixelllm: skipped {error}", file=sys.stderr)
                    bar.update(1)
            if not batch:
                continue
            try:
                results = _run_task(predictor, args, [image for _, _, image in batch])
            except ValueError as error:  # e.g. the model lacks the task's module
                print(f"pixelllm: error: {error}", file=sys.stderr)
                return 1
            for (path, name, image), result in zip(batch, results):
                record = {"image": str(path), "width": image.shape[1], "height": image.shape[0],
                          "task": args.task, "model": str(model), "result": result.to_json()}
                (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
                Image.fromarray(overlay.draw(image, result.drawing())).save(out / f"{name}.png")
                bar.update(1)
    done = len(items) - skipped
    summary = f"pixelllm: {done} of {len(items)} images written to {out}"
    print(summary + (f"; {skipped} skipped" if skipped else ""), file=sys.stderr)
    return 1 if skipped or not items else 0


if __name__ == "__main__":
    sys.exit(main())
