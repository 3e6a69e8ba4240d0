"""A board of coloured cells ("board"): the instruction-dependent set where few tokens must be the right ones.

    python -m meteor_jax.data.board --out /tmp/meteor_board --train 10000 --test 1000 --seed 0 [--image_size 64]
        [--grid 8] [--questions_per_image 4] [--train_cells 1,2,4,8,16,32,64] [--test_cells 64]

Each image is a grid × grid board (default 8 × 8 cells of 8 px on a 64 px image, so one cell is one ViT patch) on a
grey background. A painted cell is a square of one of the shapes set's six colours (drawn independently, jittered), a
pixel of background on each side. Test boards have every cell painted; a training board has a number of painted
cells drawn uniformly from `--train_cells` (the rest plain background), a curriculum inside every batch as in the
shapes set: with one painted cell the answer is the only colour shown, with more the model has to find the named
cell (on full boards alone, the shapes recipe stayed at the prior for 1600 steps). A question names a painted cell by its row and
column (from 1, top left) and asks its colour:

  colour        What colour is row 3 column 5?         red | green | blue | yellow | purple | cyan

So a question needs exactly one of the 64 visual tokens, and which one depends only on the question. This is the set
where keeping few tokens has to choose them: 2×2 average pooling of an 8 × 8 board gives 4 tokens that each average
16 cells of independent colours, and random or question-blind choices of 4 tokens hold the asked cell 1 time in 16.
The shapes set (meteor_jax/data/shapes.py) has at most four objects, each covering many patches, so there a pooled
window holds an object whole. Every image gets min(`questions_per_image`, painted cells) questions about distinct
painted cells, in both splits; the question alone gives the uniform prior (1/6).

Written under OUT, in the shapes set's format (meteor_jax.data.shapes.write_dataset): images/{train,test}_NNNNNN.png,
train.json and test.json (LLaVA JSON; each record's `target` is the asked cell: colour, row, column, bbox
[x0, y0, x1, y1) of the cell in pixels), test_questions.jsonl, test_ground_truth.jsonl and dataset.json (written
last). Deterministic: image i of a split is drawn from numpy's default_rng([seed, split, i]).
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from meteor_jax.data import shapes

VERSION = 1
GENERATOR = "meteor_jax.data.board"
GRID = 8  # cells per side
QUESTION_TYPE = "colour"


def default_cells(split: str, grid: int) -> tuple[int, ...]:
    """Painted cells of a board, drawn uniformly: train 1, 2, 4, ... and grid² (1, 2, 4, 8, 16, 32, 64 for 8 × 8);
    test grid² (all)."""
    if split == "test":
        return (grid * grid,)
    return tuple(2 ** k for k in range((grid * grid - 1).bit_length())) + (grid * grid,)


def question(row: int, column: int) -> str:
    """The question about the cell in 0-based (row, column)."""
    return f"What colour is row {row + 1} column {column + 1}?"


def make_image(rng: np.random.Generator, image_size: int = 64, grid: int = GRID,
               painted: int | None = None) -> tuple[Image.Image, np.ndarray]:
    """The board image and its colours: indices into shapes.COLOURS, -1 for a cell left unpainted, (grid, grid),
    row-major from the top left. `painted` cells (default all) at random are painted."""
    names = list(shapes.COLOURS)
    bg = int(rng.integers(shapes.BACKGROUND[0], shapes.BACKGROUND[1] + 1))
    image = Image.new("RGB", (image_size, image_size), (bg, bg, bg))
    draw = ImageDraw.Draw(image)
    colours = rng.integers(len(names), size=(grid, grid))
    if painted is not None and painted < grid * grid:
        blank = np.ones(grid * grid, bool)
        blank[rng.choice(grid * grid, size=painted, replace=False)] = False
        colours[blank.reshape(grid, grid)] = -1
    jitter = rng.integers(-shapes.COLOUR_JITTER, shapes.COLOUR_JITTER + 1, (grid, grid, 3))
    for row, column in zip(*np.nonzero(colours >= 0)):
        x0, y0, x1, y1 = cell_box(int(row), int(column), image_size, grid)
        rgb = np.clip(np.array(shapes.COLOURS[names[colours[row, column]]]) + jitter[row, column], 0, 255)
        draw.rectangle((x0 + 1, y0 + 1, x1 - 2, y1 - 2), fill=tuple(int(c) for c in rgb))  # inclusive corners
    return image, colours


def cell_box(row: int, column: int, image_size: int, grid: int) -> tuple[int, int, int, int]:
    """The cell's box [x0, y0, x1, y1) in pixels (the painted square lies a pixel inside it)."""
    cell = image_size // grid
    return column * cell, row * cell, (column + 1) * cell, (row + 1) * cell


def make_split(split: str, num_images: int, seed: int, image_size: int = 64, grid: int = GRID,
               questions_per_image: int = 4, cells: Sequence[int] | None = None,
               progress: bool = False) -> tuple[dict[str, bytes], list[dict]]:
    """The PNG bytes by file name and the LLaVA records of one split (records in image order). Each board has one of
    `cells` painted cells (drawn uniformly; default `default_cells`)."""
    shapes.check_split(split)
    cells = default_cells(split, grid) if cells is None else tuple(int(n) for n in cells)
    check_args(num_images=num_images, seed=seed, image_size=image_size, grid=grid,
               questions_per_image=questions_per_image, cells=cells)
    names = list(shapes.COLOURS)
    images, records = {}, []
    for i, rng in shapes.image_streams("board", split, num_images, seed, progress):
        painted = cells[int(rng.integers(len(cells)))]
        image, colours = make_image(rng, image_size, grid, painted)
        name = f"{split}_{i:06d}.png"
        images[name] = shapes.png_bytes(image)
        choices = np.flatnonzero(colours.reshape(-1) >= 0)
        for q, cell in enumerate(rng.choice(choices, size=min(questions_per_image, painted), replace=False)):
            row, column = divmod(int(cell), grid)
            colour = names[colours[row, column]]
            records.append(dict(
                id=f"{split}_{i:06d}_{q}", image=name,
                conversations=[{"from": "human", "value": f"<image>\n{question(row, column)}"},
                               {"from": "gpt", "value": colour}],
                question_type=QUESTION_TYPE, num_objects=painted,
                target=dict(colour=colour, row=row, column=column,
                            bbox=list(cell_box(row, column, image_size, grid)))))
    return images, records


def check_args(*, num_images: int | None = None, num_train: int | None = None, num_test: int | None = None,
               seed: int = 0, image_size: int = 64, grid: int = GRID, questions_per_image: int = 4,
               cells: Sequence[int] | None = None, train_cells: Sequence[int] | None = None,
               test_cells: Sequence[int] | None = None) -> None:
    """ValueError naming the bad argument."""
    for flag, n in (("--train", num_train), ("--test", num_test)):
        if n is not None and n < 1:
            raise ValueError(f"{flag} must be at least 1 image, got {n}")
    if num_images is not None and num_images < 0:
        raise ValueError(f"the number of images must be >= 0, got {num_images}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if grid < 2:
        raise ValueError(f"--grid must be at least 2 cells per side, got {grid}")
    if image_size % grid or image_size // grid < 4:
        raise ValueError(f"--image_size must be a multiple of --grid with cells of at least 4 px (a coloured square "
                         f"inside a pixel of background), got {image_size} px for {grid} cells")
    if not 1 <= questions_per_image <= grid * grid:
        raise ValueError(f"--questions_per_image must be in [1, {grid * grid}] (distinct cells), "
                         f"got {questions_per_image}")
    for flag, counts in (("cells", cells), ("--train_cells", train_cells), ("--test_cells", test_cells)):
        if counts is not None and (not len(counts) or any(not 1 <= int(n) <= grid * grid for n in counts)):
            raise ValueError(f"{flag} must be a non-empty list of painted-cell counts in [1, {grid * grid}], "
                             f"got {list(counts)}")


def _args(num_train, num_test, seed, image_size, grid, questions_per_image, train_cells, test_cells) -> dict:
    return dict(num_train=num_train, num_test=num_test, seed=seed, image_size=image_size, grid=grid,
                questions_per_image=questions_per_image,
                train_cells=list(default_cells("train", grid) if train_cells is None else map(int, train_cells)),
                test_cells=list(default_cells("test", grid) if test_cells is None else map(int, test_cells)))


def generate(out: str | os.PathLike, *, num_train: int, num_test: int, seed: int = 0, image_size: int = 64,
             grid: int = GRID, questions_per_image: int = 4, train_cells: Sequence[int] | None = None,
             test_cells: Sequence[int] | None = None, progress: bool = True) -> dict:
    """Write the dataset under `out` (see the module docstring); returns the manifest (also OUT/dataset.json). An
    existing dataset in `out` is replaced."""
    check_args(num_train=num_train, num_test=num_test, seed=seed, image_size=image_size, grid=grid,
               questions_per_image=questions_per_image, train_cells=train_cells, test_cells=test_cells)
    args = _args(num_train, num_test, seed, image_size, grid, questions_per_image, train_cells, test_cells)
    splits = {split: make_split(split, args[f"num_{split}"], seed, image_size, grid, questions_per_image,
                                args[f"{split}_cells"], progress=progress) for split in ("train", "test")}
    return shapes.write_dataset(out, splits, dict(generator=GENERATOR, version=VERSION, args=args))


def ensure_dataset(out: str | os.PathLike, *, num_train: int, num_test: int, seed: int = 0, image_size: int = 64,
                   grid: int = GRID, questions_per_image: int = 4, train_cells: Sequence[int] | None = None,
                   test_cells: Sequence[int] | None = None, progress: bool = True) -> dict:
    """The dataset in `out`: generated when `out` holds no complete dataset (no dataset.json). A complete one made
    by another generator or with other arguments is an error (never silently replaced or used)."""
    wanted = _args(num_train, num_test, seed, image_size, grid, questions_per_image, train_cells, test_cells)
    manifest = shapes.existing_manifest(out, GENERATOR, VERSION, wanted)
    return manifest or generate(out, progress=progress, **wanted)


def main(argv: Sequence[str] | None = None) -> int:
    parser = shapes.generator_parser(GENERATOR, __doc__)
    parser.add_argument("--image_size", type=int, default=64, help="image side in pixels (a multiple of --grid)")
    parser.add_argument("--grid", type=int, default=GRID, help=f"cells per side (default {GRID})")
    parser.add_argument("--questions_per_image", type=int, default=4, help="questions per image, about distinct cells")
    parser.add_argument("--train_cells", type=shapes.parse_counts, default=None,
                        help="painted-cell counts of training boards, drawn uniformly per image (comma-separated; "
                             "default 1,2,4,... and every cell: 1,2,4,8,16,32,64 on 8 × 8)")
    parser.add_argument("--test_cells", type=shapes.parse_counts, default=None,
                        help="painted-cell counts of test boards (default: every cell)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        manifest = generate(args.out, num_train=args.train, num_test=args.test, seed=args.seed,
                            image_size=args.image_size, grid=args.grid, questions_per_image=args.questions_per_image,
                            train_cells=args.train_cells, test_cells=args.test_cells, progress=not args.quiet)
    except ValueError as e:
        parser.error(str(e))  # usage + "error: ..." on stderr, exit status 2
    print(shapes.summary(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
