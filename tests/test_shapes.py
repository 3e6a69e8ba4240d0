"""meteor_jax/data/shapes.py (the instruction-dependent shapes dataset) and configs/shapes.py."""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from meteor_jax.data import shapes
from meteor_jax.data.llava import LlavaJsonSource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "data"
    shapes.generate(out, num_train=40, num_test=10, seed=3, progress=False)
    return out


def _files(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


# ------------------------------------------------------------------------------------ a solver that reads pixels


def _read_object(mask: np.ndarray, rgb: np.ndarray, x_offset: int, y_offset: int) -> dict:
    """One object's colour (the nearest palette colour to its median), shape (which of a few probe points inside
    its box are filled) and bounding box, from the mask of its pixels in `rgb` (a crop at the given offset)."""
    palette = np.array(list(shapes.COLOURS.values()))
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    median = np.median(rgb[mask], axis=0)
    colour = list(shapes.COLOURS)[int(np.argmin(((palette - median) ** 2).sum(-1)))]
    w = x1 - x0

    def filled(fx, fy):
        return bool(mask[int(round(y0 + fy * w)), int(round(x0 + fx * w))])

    if filled(0, 0):
        shape = "square"
    elif filled(0, 1) and filled(1, 1):
        shape = "triangle"  # both bottom corners, no top corner
    elif filled(0.25, 0.25):
        shape = "circle"  # the cross leaves its bounding box's quarter points empty
    else:
        shape = "cross"
    return dict(colour=colour, shape=shape,
                bbox=[int(x0 + x_offset), int(y0 + y_offset), int(x1 + x_offset + 1), int(y1 + y_offset + 1)])


def _detect(rgb: np.ndarray) -> list[dict]:
    """The objects of a quadrant-layout image from its pixels alone: per quadrant, the pixels that differ from the
    background (the corner pixel: objects keep a margin)."""
    cell = rgb.shape[0] // 2
    rgb = rgb.astype(int)
    found = []
    for k, position in enumerate(shapes.POSITIONS):
        r0, c0 = (k // 2) * cell, (k % 2) * cell
        patch = rgb[r0:r0 + cell, c0:c0 + cell]
        mask = np.abs(patch - rgb[0, 0]).max(-1) > 30
        if mask.any():  # else an empty quadrant (training images may hold fewer than four objects)
            found.append(dict(position=position, **_read_object(mask, patch, c0, r0)))
    return found


def _detect_free(rgb: np.ndarray) -> list[dict]:
    """The objects of a free-layout image from its pixels alone: the 8-connected regions that differ from the
    background (objects never touch), each placed in the quadrant of its box's centre; in quadrant order, then
    top to bottom, then left to right."""
    size = rgb.shape[0]
    rgb = rgb.astype(int)
    foreground = np.abs(rgb - rgb[0, 0]).max(-1) > 30
    seen = np.zeros_like(foreground)
    found = []
    for start in zip(*np.nonzero(foreground)):
        if seen[start]:
            continue
        region, stack = np.zeros_like(foreground), [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            region[y, x] = True
            for ny in range(max(y - 1, 0), min(y + 2, size)):
                for nx in range(max(x - 1, 0), min(x + 2, size)):
                    if foreground[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        obj = _read_object(region, rgb, 0, 0)
        x0, y0, x1, y1 = obj["bbox"]
        quadrant = 2 * int((y0 + y1) / 2 >= size // 2) + int((x0 + x1) / 2 >= size // 2)
        found.append((quadrant, y0, x0, dict(position=shapes.POSITIONS[quadrant], **obj)))
    return [obj for *_, obj in sorted(found, key=lambda o: o[:3])]


def _solve(question: str, objects: list[dict]) -> str:
    """Answer a question from the detected objects (the question text names exactly one of them, or asks for all
    of them in quadrant order or in the order circle, square, triangle, cross)."""
    if question == "Describe the image.":
        return " and ".join(f"{o['colour']} {o['shape']} {o['position']}" for o in objects)
    if question == "Describe each shape.":
        order = ["circle", "square", "triangle", "cross"]
        return " and ".join(f"{o['shape']} {o['colour']} {o['position']}"
                            for o in sorted(objects, key=lambda o: order.index(o["shape"])))
    patterns = [(r"What colour is the (\w+)\?", "shape", "colour"), (r"What shape is the (\w+) object\?", "colour",
                                                                      "shape"),
                (r"Where is the (\w+) object\?", "colour", "position"), (r"Where is the (\w+)\?", "shape", "position")]
    for pattern, key in ((r"Is there a (\w+) object\?", "colour"), (r"Is there a (\w+)\?", "shape")):
        m = re.fullmatch(pattern, question)
        if m:
            return "yes" if any(o[key] == m.group(1) for o in objects) else "no"
    for pattern, key, attribute in patterns:
        m = re.fullmatch(pattern, question)
        if m:
            named = [o for o in objects if o[key] == m.group(1)]
            assert len(named) == 1, (question, objects)
            return named[0][attribute]
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("describe, kinds", [(0, set()), (1, {shapes.DESCRIBE}), (2, {shapes.DESCRIBE_SHAPES}),
                                             (3, {shapes.DESCRIBE, shapes.DESCRIBE_SHAPES})])
def test_describe_bits(describe, kinds):
    _, records = shapes.make_split("train", 6, seed=2, describe=describe)
    found = [r["question_type"] for r in records if r["question_type"].startswith("describe")]
    assert set(found) == kinds and len(found) == 6 * len(kinds)  # one of each asked kind per image
    with pytest.raises(ValueError, match="describe is a set of bits"):
        shapes.make_split("train", 1, seed=2, describe=4)


@pytest.mark.parametrize("objects, layout", [((4,), "quadrants"), ((1, 2, 3, 4), "quadrants"), ((4,), "free"),
                                             ((1, 2, 3, 4), "free")])
def test_every_answer_is_read_from_the_named_objects_pixels(objects, layout):
    """Generated answers (descriptions included) equal what a pixel-level solver reads from the named object's
    region, and the recorded bounding box is that object's."""
    images, records = shapes.make_split("train", 150, seed=11, questions_per_image=16, objects=objects, exists=2,
                                        describe=3, layout=layout)
    detect = _detect if layout == "quadrants" else _detect_free
    assert len({r["id"] for r in records}) == len(records)
    assert len(records) == sum(4 * r["num_objects"] + 4 for r in records if r["id"].endswith("_0"))
    assert sum(r["question_type"] == shapes.DESCRIBE for r in records) == 150
    assert sum(r["question_type"] == shapes.DESCRIBE_SHAPES for r in records) == 150
    detected = {name: detect(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))) for name, data in images.items()}
    counts = {r["image"]: r["num_objects"] for r in records}
    assert set(counts.values()) == set(objects)
    for name, found in detected.items():
        assert len(found) == counts[name], name
        assert len({o["shape"] for o in found}) == len({o["colour"] for o in found}) == len(found), name
        if len(found) == 4:
            assert sorted(o["shape"] for o in found) == sorted(shapes.SHAPES), name
    for r in records:
        question, answer = shapes.question_text(r), shapes.answer_text(r)
        objects = detected[r["image"]]
        assert _solve(question, objects) == answer, (r["id"], question, answer, objects)
        if r["target"] is None:
            assert ((r["question_type"], answer) == (shapes.EXISTS, "no")
                    or r["question_type"] in (shapes.DESCRIBE, shapes.DESCRIBE_SHAPES))
            continue
        target = next(o for o in objects if o["shape"] == r["target"]["shape"])
        assert target["bbox"] == r["target"]["bbox"], r["id"]
        assert (target["shape"], target["colour"]) == (r["target"]["shape"], r["target"]["colour"])
    # 16 questions per image (at most 4 per object): every (type, object) pair exactly once
    by_image = {}
    for r in records:
        if r["question_type"] not in (shapes.EXISTS, shapes.DESCRIBE, shapes.DESCRIBE_SHAPES):
            by_image.setdefault(r["image"], []).append((r["question_type"], r["target"]["shape"]))
    assert all(len(set(asked)) == len(asked) == 4 * counts[name] for name, asked in by_image.items())


def test_free_layout_breaks_the_one_object_per_quadrant_prior():
    """Free placement is what it claims: no two boxes touch or overlap, and a fixed 2×2 grid no longer holds one
    object per cell (a few test images put two objects in one quadrant, about a third of the boxes straddle a
    midline)."""
    _, records = shapes.make_split("test", 200, seed=5, layout="free")
    boxes = {}
    for r in records:
        boxes.setdefault(r["image"], {})[r["target"]["shape"]] = r["target"]
    shared = straddling = 0
    for objects in boxes.values():
        for a in objects.values():
            for b in objects.values():
                if a is not b:
                    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
                    assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0, (a, b)  # a pixel apart at least
        shared += len({o["position"] for o in objects.values()}) < len(objects)
        straddling += sum(o["bbox"][0] < 32 < o["bbox"][2] or o["bbox"][1] < 32 < o["bbox"][3]
                          for o in objects.values())
    assert shared >= 3 and straddling >= 200  # of 200 images, 800 objects (5 and 260 with this seed)
    with pytest.raises(ValueError, match="layout"):
        shapes.make_split("test", 1, seed=5, layout="grid")


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes(tmp_path):
    for name in ("a", "b"):
        shapes.generate(tmp_path / name, num_train=12, num_test=4, seed=5, progress=False)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b and len([k for k in a if k.startswith("images")]) == 16
    shapes.generate(tmp_path / "c", num_train=12, num_test=4, seed=6, progress=False)
    c = _files(tmp_path / "c")
    assert c.keys() == a.keys() and c["train.json"] != a["train.json"]
    assert c["images/train_000000.png"] != a["images/train_000000.png"]
    # image i does not depend on how many images the split has, and train and test never share an image
    images, _ = shapes.make_split("train", 3, seed=5)
    assert images["train_000002.png"] == a["images/train_000002.png"]
    test_images, _ = shapes.make_split("test", 3, seed=5)
    assert not set(images.values()) & set(test_images.values())


# --------------------------------------------------------------------------------------------- answer priors


def test_answer_priors_are_near_uniform_and_the_question_alone_does_not_tell():
    _, train = shapes.make_split("train", 2000, seed=0)
    _, test = shapes.make_split("test", 500, seed=0)
    assert len(train) == 10000 and len(test) == 2000  # 4 questions per image + 1 existence question in train
    dist = shapes.answer_distribution(train)
    assert sorted(dist) == sorted(shapes.QUESTION_TYPES + (shapes.EXISTS,))
    assert sorted(shapes.answer_distribution(test)) == sorted(shapes.QUESTION_TYPES)
    for qtype, answers in dist.items():
        expected = 1 / len(answers)
        assert len(answers) == {"colour": len(shapes.COLOURS), shapes.EXISTS: 2}.get(qtype, 4)
        assert max(abs(p - expected) for p in answers.values()) < 0.03, (qtype, answers)
    prior = shapes.text_prior_accuracy(train, test)
    assert prior["all"] < 0.27, prior
    assert prior["colour"] < 1 / 6 + 0.05 and all(prior[t] < 0.25 + 0.05 for t in ("shape", "where_shape",
                                                                                    "where_colour")), prior


# ------------------------------------------------------------------------------------ the files the pipeline reads


def test_files_read_by_llava_json_source_and_the_benchmark_path(dataset):
    from meteor_jax.eval import answering, benchmarks

    manifest = json.loads((dataset / "dataset.json").read_text())
    assert manifest["questions"] == dict(train=200, test=40)
    assert manifest["args"]["train_objects"] == [1, 2, 3, 4] and manifest["args"]["test_objects"] == [4]
    source = LlavaJsonSource(dataset / "train.json", dataset / "images")
    assert len(source) == 200
    record = source[0]
    assert record["conversations"][0]["value"].startswith("<image>\n") and record["image_bytes"] is not None
    assert Image.open(io.BytesIO(record["image_bytes"])).size == (64, 64)
    test = LlavaJsonSource(dataset / "test.json", dataset / "images")
    assert all(test[i]["num_objects"] == 4 for i in range(len(test)))
    ground_truth = benchmarks.load_ground_truth(dataset / "test_ground_truth.jsonl")
    assert set(ground_truth) == {r["id"] for r in (test[i] for i in range(len(test)))}
    questions = answering.read_questions(str(dataset / "test_questions.jsonl"), str(dataset / "images"))
    assert [q["id"] for q in questions] == [test[i]["id"] for i in range(len(test))]
    assert all(os.path.isfile(q["image"]) for q in questions)
    # the easy_vqa scorer: gold answers score 1, a constant guess scores the prior
    gold = [dict(question_id=k, text=v["answer"]) for k, v in ground_truth.items()]
    assert benchmarks.score("easy_vqa", gold, ground_truth)["accuracy"] == 1.0
    wrong = [dict(question_id=k, text="nothing") for k in ground_truth]
    assert benchmarks.score("easy_vqa", wrong, ground_truth)["accuracy"] == 0.0


def test_ensure_dataset_reuses_a_complete_dataset_and_refuses_another(dataset, tmp_path):
    before = os.stat(dataset / "train.json").st_mtime_ns
    shapes.ensure_dataset(dataset, num_train=40, num_test=10, seed=3)
    assert os.stat(dataset / "train.json").st_mtime_ns == before
    # a dataset written before descriptions existed (no train_describe in its manifest) is one without them
    manifest = json.loads((dataset / "dataset.json").read_text())
    del manifest["args"]["train_describe"]
    (dataset / "dataset.json").write_text(json.dumps(manifest))
    shapes.ensure_dataset(dataset, num_train=40, num_test=10, seed=3)
    with pytest.raises(ValueError, match="made by .* with"):
        shapes.ensure_dataset(dataset, num_train=40, num_test=10, seed=3, train_describe=1)
    assert os.stat(dataset / "train.json").st_mtime_ns == before
    with pytest.raises(ValueError, match="made by .* with .*num_train.: 40"):
        shapes.ensure_dataset(dataset, num_train=40, num_test=10, seed=4)
    # a dataset written before layouts existed (no layout in its manifest) is a quadrants one
    del manifest["args"]["layout"]
    (dataset / "dataset.json").write_text(json.dumps(manifest))
    shapes.ensure_dataset(dataset, num_train=40, num_test=10, seed=3)
    with pytest.raises(ValueError, match="made by .* with .*'layout': 'quadrants'"):
        shapes.ensure_dataset(dataset, num_train=40, num_test=10, seed=3, layout="free")
    # an incomplete directory (no dataset.json) is regenerated
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train.json").write_text("[")
    shapes.ensure_dataset(tmp_path / "partial", num_train=2, num_test=1, seed=0, progress=False)
    assert len(json.loads((tmp_path / "partial" / "train.json").read_text())) == 10


def assert_every_sample_fits(config) -> None:
    """The config's word vocabulary (trained on its training records, as the run trains it), max_len and
    instruction_len hold every training sample whole."""
    from meteor_jax import config as config_lib
    from meteor_jax.data.features import make_features
    from meteor_jax.data.templates import instruction_text
    from meteor_jax.data.tokenizer import train_word_tokenizer
    from meteor_jax.run import _template_words

    config, model_cfg = config_lib.validate(config)
    source = LlavaJsonSource(config.data.train.partition(":")[2], config.data.image_folder)
    records = [source[i] for i in range(len(source))]
    tokenizer = train_word_tokenizer([t["value"] for r in records for t in r["conversations"]]
                                     + [_template_words(config.data.template)])
    assert tokenizer.vocab_size <= model_cfg.llm.vocab_size
    spec = config_lib.feature_spec(config, model_cfg)
    assert spec.num_image_tokens == 64 == model_cfg.vision.num_patches
    image = np.zeros((64, 64, 3), np.float32)
    for r in records:
        features = make_features(r, tokenizer, spec, image=image)
        assert not features["truncated"], r["id"]
        assert len(tokenizer.encode(instruction_text(r["conversations"]))) <= spec.instruction_len


def test_config_generates_its_dataset_and_every_sample_fits(tmp_path, monkeypatch):
    """configs/shapes.py:DIR generates the dataset in DIR (configs/shapes.py:free:DIR the free layout); its
    vocabulary, max_len and instruction_len hold every sample of it whole."""
    from configs import shapes as shapes_config

    monkeypatch.setattr(shapes_config, "NUM_TRAIN", 30)
    monkeypatch.setattr(shapes_config, "NUM_TEST", 5)
    config = shapes_config.get_config(str(tmp_path / "data"))
    assert config.data.train == f"llava_json:{tmp_path}/data/train.json"
    assert_every_sample_fits(config)
    with pytest.raises(ValueError, match="made by meteor_jax.data.shapes with .*'layout': 'quadrants'"):
        shapes_config.get_config(f"free:{tmp_path}/data")
    free = shapes_config.get_config(f"free:{tmp_path}/free")  # the free layout: its own directory
    assert free.data.train == f"llava_json:{tmp_path}/free/train.json"
    assert json.loads((tmp_path / "free" / "dataset.json").read_text())["args"]["layout"] == "free"
    with pytest.raises(ValueError, match="holds a dataset made by meteor_jax.data.shapes with"):
        monkeypatch.setattr(shapes_config, "NUM_TRAIN", 31)
        shapes_config.get_config(str(tmp_path / "data"))


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_the_dataset(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "meteor_jax.data.shapes", "--out", str(out), "--train", "3",
                             "--test", "2", "--seed", "1", "--image_size", "48",
                             "--train_objects", "2", "--test_objects", "3"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "wrote 15 train and 8 test questions" in result.stdout
    assert "shapes train" in result.stderr  # the progress bar
    assert Image.open(out / "images" / "test_000001.png").size == (48, 48)
    assert len((out / "test_questions.jsonl").read_text().splitlines()) == 8
    args = json.loads((out / "dataset.json").read_text())["args"]
    assert (args["train_objects"], args["test_objects"], args["image_size"]) == ([2], [3], 48)


@pytest.mark.parametrize("args, message", [
    (["--train", "0", "--test", "1"], "--train must be at least 1"),
    (["--train", "2", "--test", "0"], "--test must be at least 1"),
    (["--train", "2", "--test", "1", "--seed", "-1"], "--seed must be >= 0"),
    (["--train", "2", "--test", "1", "--image_size", "31"], "--image_size must be an even number >= 32"),
    (["--train", "2", "--test", "1", "--questions_per_image", "17"], r"--questions_per_image must be in \[1, 16\]"),
    (["--train", "two", "--test", "1"], "argument --train: invalid int value"),
    (["--test", "1"], "the following arguments are required: --train"),
    (["--train", "2", "--test", "1", "--train_objects", "0,4"], r"--train_objects must be .* in \[1, 4\]"),
    (["--train", "2", "--test", "1", "--test_objects", "5"], r"--test_objects must be .* in \[1, 4\]"),
    (["--train", "2", "--test", "1", "--train_objects", "1,two"], "expected comma-separated integers"),
    (["--train", "2", "--test", "1", "--train_exists", "-1"], "--train_exists must be >= 0"),
    (["--train", "2", "--test", "1", "--train_describe", "4"], r"--train_describe must be 0 to 3"),
    (["--train", "2", "--test", "1", "--layout", "grid"], r"argument --layout: invalid choice: 'grid'"),
])
def test_cli_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        shapes.main(["--out", str(tmp_path / "x"), "--quiet", *args])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_file_as_out(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        shapes.main(["--out", str(tmp_path / "file"), "--train", "1", "--test", "1", "--quiet"])
    assert "exists and is not a directory" in capsys.readouterr().err
