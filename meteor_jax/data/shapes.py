"""An instruction-dependent synthetic VQA dataset ("shapes"): every question names one of four objects, and only
that object's region answers it, so the visual tokens a model needs depend on the question.

    python -m meteor_jax.data.shapes --out /tmp/meteor_shapes --train 10000 --test 1000 --seed 0 [--image_size 64]
        [--questions_per_image 4] [--train_objects 1,2,3,4] [--test_objects 4] [--train_exists 1]
        [--train_describe 0] [--layout quadrants]

Each test image is a plain grey background with four objects, one per quadrant at a jittered position and size
(`--layout quadrants`, the default) or anywhere in the image without overlapping (`--layout free`; an object's
position is then the quadrant its centre lies in, and two objects may share one):
the four shapes (circle, square, triangle, cross) in a random order, each in a different colour drawn from six
(red, green, blue, yellow, purple, cyan). Training images hold 1 to 4 such objects (`--train_objects`, drawn
uniformly; the rest of the quadrants empty): a one-object image teaches what a shape, a colour and a quadrant look
like, the others teach finding the named object among distractors. Questions name an object by its shape or its
colour and ask for another of its attributes:

  colour        What colour is the triangle?           red | green | blue | yellow | purple | cyan
  shape         What shape is the blue object?         circle | square | triangle | cross
  where_shape   Where is the circle?                   top left | top right | bottom left | bottom right
  where_colour  Where is the red object?               top left | ...

Every image gets `questions_per_image` questions (default 4: one of each type, about different objects where
possible; at most 4 per object). Training images also get `--train_exists` (default 1) yes/no questions "Is there a
red object?" / "Is there a cross?" (half of them yes); the test split has none of them. `--train_describe` is a set
of bits: with 1 each training image also gets "Describe the image." → its objects in quadrant order ("red cross top
left and purple triangle top right"), LLaVA's stage-1 caption; with 2 "Describe each shape." → its objects in shape
order, each shape first ("circle yellow bottom left and cross red top left"); 3 gives both. The named object is
drawn uniformly, so within a question type every answer is equally likely and the question alone gives no more than
the uniform prior (1/6 colour, 1/4 otherwise):
`text_prior_accuracy` measures the best text-only predictor (the training split's most common answer for each exact
question) on the test split, and dataset.json records it.

Written under OUT (the files the pipeline and the benchmark path read):
  images/{train,test}_NNNNNN.png   RGB PNGs
  train.json, test.json            LLaVA JSON (`llava_json:OUT/train.json` with data.image_folder=OUT/images);
                                   each record also carries its question_type and the named object ("target":
                                   shape, colour, position, bbox [x0, y0, x1, y1) in pixels)
  test_questions.jsonl             LLaVA question file: {question_id, image, text}
  test_ground_truth.jsonl          {question_id, answer, question_type, shape, colour, position, bbox}
                                   (`python -m meteor_jax.evaluate --benchmark easy_vqa` scores it)
  dataset.json                     the generator's arguments and the counts; written last, so its presence means
                                   the dataset is complete (`ensure_dataset` regenerates only when it is missing)

Deterministic: image i of a split is drawn from numpy's default_rng([seed, split, i]), so the same arguments give
byte-identical files, and the train and test images never share a random stream.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from meteor_jax.data.templates import instruction_text

VERSION = 1
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # well separated in RGB, none close to the grey background
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 200),
    "cyan": (30, 200, 210),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant k: row k // 2, column k % 2
# quadrants: one object per quadrant, so 2×2 average pooling hands a model one token per object (a perfect prior
# for pooling to 4 tokens); free: objects anywhere, not overlapping, so no fixed grid of tokens holds one each.
LAYOUTS = ("quadrants", "free")
_FREE_TRIES = 1000  # placements drawn per object before the image starts over (free layout)
QUESTION_TYPES = ("colour", "shape", "where_shape", "where_colour")
MAX_QUESTIONS_PER_IMAGE = len(QUESTION_TYPES) * len(POSITIONS)  # every (type, object) pair once
# Training images also get yes/no existence questions ("Is there a red object?", "Is there a cross?"; yes for half
# of them). They need no search, only the named word and what the whole image shows, so they teach the model to
# carry the question's colour or shape word to the answer early, which finding the named object then builds on.
EXISTS = "exists"
TRAIN_EXISTS = 1
# Training images can also get a description (LLaVA's stage-1 captions): "Describe the image." → every object in
# quadrant order, "red triangle top left and blue circle bottom right". One answer names every object's colour,
# shape and quadrant, a dense signal that teaches a from-scratch vision tower what each region holds, where a
# question names only one object and asks one of its attributes. The other description (bit 2), "Describe each
# shape." → "circle red top left and cross blue bottom right", lists the objects in shape order with the shape first:
# the quadrant-order one teaches reading an object found by its place, this one finding an object by its shape, which
# questions such as "What colour is the triangle?" need and which questions alone teach slowest.
DESCRIBE = "describe"
DESCRIBE_QUESTION = "Describe the image."
DESCRIBE_SHAPES = "describe_shapes"
DESCRIBE_SHAPES_QUESTION = "Describe each shape."
DESCRIBE_IMAGE_BIT, DESCRIBE_SHAPES_BIT = 1, 2  # `describe` / `--train_describe` is a set of these bits
ALL_DESCRIPTIONS = DESCRIBE_IMAGE_BIT | DESCRIBE_SHAPES_BIT
TRAIN_DESCRIBE = 0
COLOUR_JITTER = 12  # each channel of an object's colour moves by at most this much
BACKGROUND = (170, 235)  # the grey level of the background, uniform in [lo, hi]
_SPLITS = {"train": 0, "test": 1}
# Objects per image. Training images hold 1 to 4 objects: with one object the answer is what the whole image
# shows, with more the model has to find the named one, a curriculum inside every batch. Test images hold 4.
TRAIN_OBJECTS = (1, 2, 3, 4)
TEST_OBJECTS = (4,)


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    position: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the drawn shape, in pixels
    rgb: tuple[int, int, int]  # the exact fill colour drawn (palette colour + jitter)


def _question(qtype: str, obj: Obj) -> tuple[str, str]:
    if qtype == "colour":
        return f"What colour is the {obj.shape}?", obj.colour
    if qtype == "shape":
        return f"What shape is the {obj.colour} object?", obj.shape
    if qtype == "where_shape":
        return f"Where is the {obj.shape}?", obj.position
    if qtype == "where_colour":
        return f"Where is the {obj.colour} object?", obj.position
    raise ValueError(f"unknown question type {qtype!r}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box  # inclusive corners for Pillow: the shape covers [x0, x1] × [y0, y1]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        w = x1 - x0 + 1
        t = max(w // 3, 2)  # bar thickness
        a = x0 + (w - t) // 2
        draw.rectangle((a, y0, a + t - 1, y1), fill=fill)
        b = y0 + (w - t) // 2
        draw.rectangle((x0, b, x1, b + t - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def make_image(rng: np.random.Generator, image_size: int = 64, num_objects: int = 4,
               layout: str = "quadrants") -> tuple[Image.Image, list[Obj]]:
    """One image and its objects (in quadrant order), with distinct shapes and distinct colours. `quadrants`:
    `num_objects` of the four quadrants, chosen at random, hold one object each. `free`: the objects lie anywhere
    with at least a pixel between their boxes, each labelled with the quadrant of its centre."""
    if not 1 <= num_objects <= len(POSITIONS):
        raise ValueError(f"num_objects must be in [1, {len(POSITIONS)}], got {num_objects}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    cell = image_size // 2
    bg = int(rng.integers(BACKGROUND[0], BACKGROUND[1] + 1))
    image = Image.new("RGB", (image_size, image_size), (bg, bg, bg))
    draw = ImageDraw.Draw(image)
    shapes = rng.permutation(len(SHAPES))
    names = list(COLOURS)
    colours = rng.choice(len(names), size=len(POSITIONS), replace=False)
    margin = max(cell // 16, 1)

    def paint(k: int, box: tuple[int, int, int, int], position: str) -> Obj:
        """Object k (its shape and colour of this image) drawn in `box` [x0, y0, x1, y1), its colour jittered."""
        base = np.array(COLOURS[names[colours[k]]])
        rgb = tuple(int(c) for c in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))
        x0, y0, x1, y1 = box
        _draw(draw, SHAPES[shapes[k]], (x0, y0, x1 - 1, y1 - 1), rgb)
        return Obj(SHAPES[shapes[k]], names[colours[k]], position, box, rgb)

    if layout == "free":
        boxes = _free_boxes(rng, image_size, num_objects, margin)
        objects = [paint(k, box, POSITIONS[_quadrant_of(box, cell)]) for k, box in enumerate(boxes)]
        return image, sorted(objects, key=lambda o: (POSITIONS.index(o.position), o.bbox[1], o.bbox[0]))
    occupied = np.sort(rng.choice(len(POSITIONS), size=num_objects, replace=False))
    objects = []
    for k in map(int, occupied):
        size = _object_size(rng, cell)
        room = cell - 2 * margin - size  # free pixels left in the cell
        ox = (k % 2) * cell + margin + int(rng.integers(0, room + 1))
        oy = (k // 2) * cell + margin + int(rng.integers(0, room + 1))
        objects.append(paint(k, (ox, oy, ox + size, oy + size), POSITIONS[k]))
    return image, objects


def _object_size(rng: np.random.Generator, cell: int) -> int:
    return int(rng.integers(int(cell * 0.55), int(cell * 0.8) + 1))


def _quadrant_of(box: tuple[int, int, int, int], cell: int) -> int:
    """The quadrant (POSITIONS index) holding the centre of box [x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    return 2 * int((y0 + y1) / 2 >= cell) + int((x0 + x1) / 2 >= cell)


def _free_boxes(rng: np.random.Generator, image_size: int, num_objects: int,
                margin: int) -> list[tuple[int, int, int, int]]:
    """Rejection sampling: each object's box at least a pixel away from those placed before it."""
    while True:
        boxes = []
        for _ in range(num_objects):
            size = _object_size(rng, image_size // 2)
            for _ in range(_FREE_TRIES):
                x, y = (int(v) for v in rng.integers(margin, image_size - margin - size + 1, 2))
                if all(x + size < bx0 or bx1 < x or y + size < by0 or by1 < y for bx0, by0, bx1, by1 in boxes):
                    boxes.append((x, y, x + size, y + size))
                    break
            else:
                break
        if len(boxes) == num_objects:
            return boxes


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)  # fixed settings: the same image gives the same bytes
    return buf.getvalue()


def make_split(split: str, num_images: int, seed: int, image_size: int = 64, questions_per_image: int = 4,
               objects: Sequence[int] | None = None, exists: int | None = None, describe: int | None = None,
               progress: bool = False, layout: str = "quadrants") -> tuple[dict[str, bytes], list[dict]]:
    """The PNG bytes by file name and the LLaVA records of one split (records in image order). Each image holds
    one of `objects` objects (drawn uniformly; default TRAIN_OBJECTS or TEST_OBJECTS) and gets
    min(questions_per_image, 4 × its objects) questions, then `exists` existence questions (default TRAIN_EXISTS
    for train, 0 for test), then the descriptions `describe` asks for (bits: 1 the quadrant-order one, 2 the
    shape-order one; default TRAIN_DESCRIBE for train, 0 for test)."""
    check_split(split)
    if objects is None:
        objects = TRAIN_OBJECTS if split == "train" else TEST_OBJECTS
    if exists is None:
        exists = TRAIN_EXISTS if split == "train" else 0
    if exists < 0:
        raise ValueError(f"the number of existence questions per image must be >= 0, got {exists}")
    if describe is None:
        describe = TRAIN_DESCRIBE if split == "train" else 0
    if not 0 <= describe <= ALL_DESCRIPTIONS:
        raise ValueError(f"describe is a set of bits (1: by quadrant, 2: by shape), 0 to 3, got {describe}")
    check_args(num_images=num_images, seed=seed, image_size=image_size, questions_per_image=questions_per_image,
               objects=objects, layout=layout, allow_zero=True)
    objects = tuple(int(n) for n in objects)
    images, records = {}, []
    for i, rng in image_streams("shapes", split, num_images, seed, progress):
        num_objects = objects[int(rng.integers(len(objects)))] if len(objects) > 1 else objects[0]
        image, drawn = make_image(rng, image_size, num_objects, layout)
        name = f"{split}_{i:06d}.png"
        images[name] = png_bytes(image)
        # Question q asks type q % 4 about an object not yet asked with that type (a fresh random order per type).
        orders = {t: rng.permutation(len(drawn)) for t in QUESTION_TYPES}
        asked = []
        for q in range(min(questions_per_image, len(QUESTION_TYPES) * len(drawn))):
            qtype = QUESTION_TYPES[q % len(QUESTION_TYPES)]
            obj = drawn[orders[qtype][q // len(QUESTION_TYPES)]]
            asked.append((qtype, *_question(qtype, obj), obj))
        for _ in range(exists):
            asked.append((EXISTS, *_exists_question(rng, drawn)))
        if describe & DESCRIBE_IMAGE_BIT:
            asked.append((DESCRIBE, DESCRIBE_QUESTION, describe_answer(drawn), None))
        if describe & DESCRIBE_SHAPES_BIT:
            asked.append((DESCRIBE_SHAPES, DESCRIBE_SHAPES_QUESTION, describe_shapes_answer(drawn), None))
        for q, (qtype, question, answer, obj) in enumerate(asked):
            target = None if obj is None else dict(shape=obj.shape, colour=obj.colour, position=obj.position,
                                                   bbox=list(obj.bbox))
            records.append(dict(
                id=f"{split}_{i:06d}_{q}", image=name,
                conversations=[{"from": "human", "value": f"<image>\n{question}"},
                               {"from": "gpt", "value": answer}],
                question_type=qtype, num_objects=len(drawn), target=target))
    return images, records


def check_split(split: str) -> None:
    """A clear error for a split name that is not one of the generators' splits."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")


def image_streams(name: str, split: str, num_images: int, seed: int,
                  progress: bool) -> Iterable[tuple[int, np.random.Generator]]:
    """(i, the random stream of image i of `split`): numpy's default_rng([seed, split index, i]), so every image is
    drawn independently of the others and of the other split; a progress bar "NAME SPLIT" on stderr with
    `progress`."""
    steps = range(num_images)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"{name} {split}", unit="image", file=sys.stderr, mininterval=1.0)
    for i in steps:
        yield i, np.random.default_rng([seed, _SPLITS[split], i])


def _exists_question(rng: np.random.Generator, drawn: Sequence[Obj]) -> tuple[str, str, Obj | None]:
    """"Is there a red object?" / "Is there a cross?": about a drawn object's colour or shape for half of them
    (answer yes, target that object), else about one no object has (no, no target)."""
    by_colour = bool(rng.integers(2)) or len(drawn) == len(SHAPES)  # four objects show every shape: ask a colour
    names = list(COLOURS) if by_colour else list(SHAPES)
    present = {(o.colour if by_colour else o.shape): o for o in drawn}
    absent = [n for n in names if n not in present]
    if rng.random() < 0.5:
        name, obj = absent[int(rng.integers(len(absent)))], None
    else:
        obj = drawn[int(rng.integers(len(drawn)))]
        name = obj.colour if by_colour else obj.shape
    question = f"Is there a {name} object?" if by_colour else f"Is there a {name}?"
    return question, "no" if obj is None else "yes", obj


def describe_answer(drawn: Sequence[Obj]) -> str:
    """"red triangle top left and blue circle bottom right": the objects in quadrant order."""
    return " and ".join(f"{o.colour} {o.shape} {o.position}" for o in drawn)


def describe_shapes_answer(drawn: Sequence[Obj]) -> str:
    """"circle red top left and cross blue bottom right": the objects in SHAPES order, each shape first."""
    ordered = sorted(drawn, key=lambda o: SHAPES.index(o.shape))
    return " and ".join(f"{o.shape} {o.colour} {o.position}" for o in ordered)


def question_text(record: dict) -> str:
    return instruction_text(record["conversations"])


def answer_text(record: dict) -> str:
    return record["conversations"][1]["value"]


def text_prior_accuracy(train: Sequence[dict], test: Sequence[dict]) -> dict[str, float]:
    """The accuracy on `test` of the best text-only guess learned from `train`: for each exact question text, the
    most common training answer (ties: the alphabetically first). Overall and per question type."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in train:
        counts[question_text(r)][answer_text(r)] += 1
    guess = {q: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for q, c in counts.items()}
    hits: dict[str, list[bool]] = defaultdict(list)
    for r in test:
        hit = guess.get(question_text(r)) == answer_text(r)
        hits["all"].append(hit)
        hits[r["question_type"]].append(hit)
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def answer_distribution(records: Iterable[dict]) -> dict[str, dict[str, float]]:
    """{question type: {answer: fraction}}."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        counts[r["question_type"]][answer_text(r)] += 1
    return {t: {a: n / sum(c.values()) for a, n in sorted(c.items())} for t, c in sorted(counts.items())}


def check_args(*, num_images: int | None = None, num_train: int | None = None, num_test: int | None = None,
               seed: int = 0, image_size: int = 64, questions_per_image: int = 4, objects: Sequence[int] = (4,),
               train_objects: Sequence[int] | None = None, test_objects: Sequence[int] | None = None,
               train_exists: int = 0, train_describe: int = 0, layout: str = "quadrants",
               allow_zero: bool = False) -> None:
    """ValueError naming the bad argument."""
    if num_train is not None and num_train < 1:
        raise ValueError(f"--train must be at least 1 image, got {num_train}")
    if num_test is not None and num_test < 1:
        raise ValueError(f"--test must be at least 1 image, got {num_test}")
    if num_images is not None and num_images < (0 if allow_zero else 1):
        raise ValueError(f"the number of images must be >= {0 if allow_zero else 1}, got {num_images}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if image_size < 32 or image_size % 2:
        raise ValueError(f"--image_size must be an even number >= 32 (four objects, one per quadrant), "
                         f"got {image_size}")
    if not 1 <= questions_per_image <= MAX_QUESTIONS_PER_IMAGE:
        raise ValueError(f"--questions_per_image must be in [1, {MAX_QUESTIONS_PER_IMAGE}] (4 question types × 4 "
                         f"objects), got {questions_per_image}")
    if train_exists < 0:
        raise ValueError(f"--train_exists must be >= 0, got {train_exists}")
    if not 0 <= train_describe <= ALL_DESCRIPTIONS:
        raise ValueError(f"--train_describe must be 0 to 3 (bits: 1 by quadrant, 2 by shape), got {train_describe}")
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    for flag, counts in (("objects", objects), ("--train_objects", train_objects), ("--test_objects", test_objects)):
        if counts is not None and (not len(counts) or any(not 1 <= int(n) <= len(POSITIONS) for n in counts)):
            raise ValueError(f"{flag} must be a non-empty list of object counts in [1, {len(POSITIONS)}], "
                             f"got {list(counts)}")


def _write_jsonl(path: str, rows: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def generate(out: str | os.PathLike, *, num_train: int, num_test: int, seed: int = 0, image_size: int = 64,
             questions_per_image: int = 4, train_objects: Sequence[int] = TRAIN_OBJECTS,
             test_objects: Sequence[int] = TEST_OBJECTS, train_exists: int = TRAIN_EXISTS,
             train_describe: int = TRAIN_DESCRIBE, layout: str = "quadrants", progress: bool = True) -> dict:
    """Write the dataset under `out` (see the module docstring); returns the manifest (also DIR/dataset.json).

    Files are written into a temporary folder next to `out` and moved in at the end, and dataset.json comes last,
    so an interrupted run never leaves a dataset that looks complete. An existing dataset in `out` is replaced."""
    check_args(num_train=num_train, num_test=num_test, seed=seed, image_size=image_size,
               questions_per_image=questions_per_image, train_objects=train_objects, test_objects=test_objects,
               train_exists=train_exists, train_describe=train_describe, layout=layout)
    splits = {split: make_split(split, n, seed, image_size, questions_per_image, objects, exists, describe,
                                progress=progress, layout=layout)
              for split, n, objects, exists, describe in (
                  ("train", num_train, train_objects, train_exists, train_describe),
                  ("test", num_test, test_objects, 0, 0))}
    return write_dataset(out, splits, dict(
        generator="meteor_jax.data.shapes", version=VERSION,
        args=_args(num_train, num_test, seed, image_size, questions_per_image, train_objects, test_objects,
                   train_exists, train_describe, layout)))


def write_dataset(out: str | os.PathLike, splits: Mapping[str, tuple[dict[str, bytes], list[dict]]],
                  manifest: dict) -> dict:
    """Write the "train" and "test" splits ({split: (PNG bytes by name, LLaVA records)}, records with a
    question_type and a target dict) under `out` with the question and ground-truth files and `manifest` (plus the
    counts, the text prior and the answer distributions) as dataset.json; returns the whole manifest.

    Files are written into a temporary folder next to `out` and moved in at the end, and dataset.json comes last,
    so an interrupted run never leaves a dataset that looks complete. An existing dataset in `out` is replaced."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} exists and is not a directory")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".dataset-", dir=os.path.dirname(out))
    try:
        os.makedirs(os.path.join(tmp, "images"))
        for split, (images, records) in splits.items():
            for name, data in images.items():
                with open(os.path.join(tmp, "images", name), "wb") as f:
                    f.write(data)
            with open(os.path.join(tmp, f"{split}.json"), "w") as f:
                json.dump(records, f, separators=(",", ":"))
        train, test = splits["train"][1], splits["test"][1]
        _write_jsonl(os.path.join(tmp, "test_questions.jsonl"),
                     (dict(question_id=r["id"], image=r["image"], text=question_text(r)) for r in test))
        _write_jsonl(os.path.join(tmp, "test_ground_truth.jsonl"),
                     (dict(question_id=r["id"], answer=answer_text(r), question_type=r["question_type"], **r["target"])
                      for r in test))
        manifest = dict(
            manifest,
            images=dict(train=len(splits["train"][0]), test=len(splits["test"][0])),
            questions=dict(train=len(train), test=len(test)),
            text_prior_accuracy=text_prior_accuracy(train, test),
            train_answer_distribution=answer_distribution(train),
            test_answer_distribution=answer_distribution(test))
        for name in os.listdir(tmp):  # replace what an earlier dataset in `out` had under the same names
            target = os.path.join(out, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        os.makedirs(out, exist_ok=True)
        manifest_path = os.path.join(out, "dataset.json")
        if os.path.exists(manifest_path):
            os.remove(manifest_path)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        with open(manifest_path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(manifest_path + ".tmp", manifest_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _args(num_train, num_test, seed, image_size, questions_per_image, train_objects, test_objects,
          train_exists, train_describe, layout) -> dict:
    return dict(num_train=num_train, num_test=num_test, seed=seed, image_size=image_size,
                questions_per_image=questions_per_image, train_objects=[int(n) for n in train_objects],
                test_objects=[int(n) for n in test_objects], train_exists=int(train_exists),
                train_describe=int(train_describe), layout=layout)


def ensure_dataset(out: str | os.PathLike, *, num_train: int, num_test: int, seed: int = 0, image_size: int = 64,
                   questions_per_image: int = 4, train_objects: Sequence[int] = TRAIN_OBJECTS,
                   test_objects: Sequence[int] = TEST_OBJECTS, train_exists: int = TRAIN_EXISTS,
                   train_describe: int = TRAIN_DESCRIBE, layout: str = "quadrants", progress: bool = True) -> dict:
    """The dataset in `out`: generated when `out` holds no complete dataset (no dataset.json). A complete one made
    with other arguments is an error (never silently replaced or used)."""
    wanted = _args(num_train, num_test, seed, image_size, questions_per_image, train_objects, test_objects,
                   train_exists, train_describe, layout)
    # A dataset written before descriptions existed has none (the same files as train_describe=0), and one
    # written before free layouts is a quadrants one.
    manifest = existing_manifest(out, "meteor_jax.data.shapes", VERSION, wanted,
                                 defaults=dict(train_describe=0, layout="quadrants"))
    return manifest or generate(out, progress=progress, **wanted)


def existing_manifest(out: str | os.PathLike, generator: str, version: int, wanted: dict,
                      defaults: Mapping | None = None) -> dict | None:
    """The manifest of the complete dataset in `out` (None if it has no dataset.json). One made by another generator,
    version or arguments (`defaults` fills arguments older manifests lack) is an error, never silently used."""
    manifest_path = os.path.join(os.fspath(out), "dataset.json")
    if not os.path.isfile(manifest_path):
        return None
    with open(manifest_path) as f:
        manifest = json.load(f)
    args = manifest.get("args", {})
    for key, value in (defaults or {}).items():
        args.setdefault(key, value)
    made_by = manifest.get("generator", generator)
    if made_by != generator or manifest.get("version") != version or args != wanted:
        raise ValueError(f"{out} holds a dataset made by {made_by} with {manifest.get('args')} (version "
                         f"{manifest.get('version')}), not {wanted} (version {version}): use another "
                         f"directory, or regenerate it with python -m {generator} --out {out} ...")
    return manifest


def summary(manifest: dict, out: str | os.PathLike) -> str:
    """The generator CLIs' last line: what was written where, and the text-only prior."""
    return (f"wrote {manifest['questions']['train']} train and {manifest['questions']['test']} test questions "
            f"({manifest['images']['train']} + {manifest['images']['test']} images) to {os.path.abspath(out)}; "
            f"text-only prior accuracy on test: {manifest['text_prior_accuracy']['all']:.3f}")


def parse_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3,4, got {text!r}") from None


def generator_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A dataset generator's command line: --out, --train, --test and --seed; the generator adds its own."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (an existing dataset there is replaced)")
    parser.add_argument("--train", type=int, required=True, help="number of training images")
    parser.add_argument("--test", type=int, required=True, help="number of test images")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = generator_parser("meteor_jax.data.shapes", __doc__)
    parser.add_argument("--image_size", type=int, default=64, help="image side in pixels (even, >= 32)")
    parser.add_argument("--questions_per_image", type=int, default=4,
                        help=f"questions per image, 1..{MAX_QUESTIONS_PER_IMAGE} (cycling through the 4 types)")
    parser.add_argument("--train_objects", type=parse_counts, default=TRAIN_OBJECTS,
                        help="object counts of training images, drawn uniformly per image (comma-separated, each "
                             f"1..4; default {','.join(map(str, TRAIN_OBJECTS))})")
    parser.add_argument("--test_objects", type=parse_counts, default=TEST_OBJECTS,
                        help=f"object counts of test images (default {','.join(map(str, TEST_OBJECTS))})")
    parser.add_argument("--train_exists", type=int, default=TRAIN_EXISTS,
                        help=f"yes/no existence questions per training image (default {TRAIN_EXISTS}; test: none)")
    parser.add_argument("--train_describe", type=int, default=TRAIN_DESCRIBE,
                        help=f"bits, 0 to 3: 1 gives each training image \"{DESCRIBE_QUESTION}\" → its objects in "
                             f"quadrant order, 2 \"{DESCRIBE_SHAPES_QUESTION}\" → its objects in shape order, 3 both "
                             f"(default {TRAIN_DESCRIBE}; test: none)")
    parser.add_argument("--layout", choices=LAYOUTS, default="quadrants",
                        help="quadrants: one object per quadrant (default); free: anywhere, not overlapping")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        manifest = generate(args.out, num_train=args.train, num_test=args.test, seed=args.seed,
                            image_size=args.image_size, questions_per_image=args.questions_per_image,
                            train_objects=args.train_objects, test_objects=args.test_objects,
                            train_exists=args.train_exists, train_describe=args.train_describe,
                            layout=args.layout, progress=not args.quiet)
    except ValueError as e:
        parser.error(str(e))  # usage + "error: ..." on stderr, exit status 2
    print(summary(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
