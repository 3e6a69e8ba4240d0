"""meteor_jax/data/board.py (the board of coloured cells) and configs/shapes.py:board."""
import io
import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from meteor_jax.data import board, shapes
from meteor_jax.data.llava import LlavaJsonSource
from tests.test_shapes import REPO, _files, assert_every_sample_fits

PALETTE = np.array(list(shapes.COLOURS.values()), np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("board") / "data"
    board.generate(out, num_train=30, num_test=10, seed=2, progress=False)
    return out


def _read_board(rgb: np.ndarray, grid: int) -> list[list[str | None]]:
    """Every cell's colour read from the pixels: None for a cell of plain background (the image's top-left pixel,
    always background), else the palette colour nearest the median of its pixels that differ from the background."""
    cell = rgb.shape[0] // grid
    board_colours = []
    for row in range(grid):
        board_colours.append([])
        for column in range(grid):
            block = rgb[row * cell:(row + 1) * cell, column * cell:(column + 1) * cell].reshape(-1, 3)
            painted = block[np.abs(block.astype(np.int32) - rgb[0, 0]).max(-1) > 0].astype(np.float32)
            assert len(painted) in (0, (cell - 2) ** 2)  # nothing, or a square a pixel inside the cell
            nearest = np.argmin(((PALETTE - np.median(painted, 0)) ** 2).sum(-1)) if len(painted) else None
            board_colours[-1].append(None if nearest is None else list(shapes.COLOURS)[nearest])
    return board_colours


@pytest.mark.parametrize("split, image_size, grid, cells", [("test", 64, 8, None), ("test", 48, 4, None),
                                                            ("train", 64, 8, None), ("train", 64, 8, (3, 5))])
def test_every_answer_is_read_from_the_named_cells_pixels(split, image_size, grid, cells):
    images, records = board.make_split(split, 40, seed=1, image_size=image_size, grid=grid, questions_per_image=5,
                                       cells=cells)
    cell = image_size // grid
    read = {name: _read_board(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), grid)
            for name, png in images.items()}
    for r in records:
        row, column = (int(n) - 1 for n in re.fullmatch(r"<image>\nWhat colour is row (\d+) column (\d+)\?",
                                                         r["conversations"][0]["value"]).groups())
        assert (row, column) == (r["target"]["row"], r["target"]["column"])
        assert r["target"]["bbox"] == [column * cell, row * cell, (column + 1) * cell, (row + 1) * cell]
        assert read[r["image"]][row][column] == r["conversations"][1]["value"] == r["target"]["colour"]
    allowed = board.default_cells(split, grid) if cells is None else cells
    per_image = Counter(r["image"] for r in records)
    assert set(per_image) == set(images)  # every image is asked about
    for name, colours in read.items():
        painted = sum(c is not None for line in colours for c in line)
        assert painted in allowed
        assert per_image[name] == min(5, painted)
        asked = [(r["target"]["row"], r["target"]["column"]) for r in records if r["image"] == name]
        assert len(set(asked)) == len(asked)  # the questions of an image ask distinct cells
    if split == "train" and cells is None:
        painted_counts = {r["num_objects"] for r in records}
        assert painted_counts == {1, 2, 4, 8, 16, 32, 64}, painted_counts  # the curriculum, full boards included


def test_default_cells():
    assert board.default_cells("train", 8) == (1, 2, 4, 8, 16, 32, 64)
    assert board.default_cells("train", 3) == (1, 2, 4, 8, 9)
    assert board.default_cells("test", 8) == (64,)


def test_colours_are_uniform_and_the_question_alone_does_not_tell():
    _, train = board.make_split("train", 800, seed=0)
    _, test = board.make_split("test", 300, seed=0)
    answers = Counter(shapes.answer_text(r) for r in train)
    assert set(answers) == set(shapes.COLOURS)
    assert max(answers.values()) / len(train) < 1 / 6 + 0.03 and min(answers.values()) / len(train) > 1 / 6 - 0.03
    cells = Counter((r["target"]["row"], r["target"]["column"]) for r in train)
    assert len(cells) == 64  # every cell gets asked
    assert shapes.text_prior_accuracy(train, test)["all"] < 1 / 6 + 0.05


def test_same_seed_same_bytes_and_splits_differ(tmp_path):
    for name in ("a", "b"):
        board.generate(tmp_path / name, num_train=6, num_test=3, seed=4, progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    a = (tmp_path / "a" / "images")
    assert (a / "train_000000.png").read_bytes() != (a / "test_000000.png").read_bytes()


def test_files_read_by_llava_json_source_and_the_ground_truth(dataset):
    source = LlavaJsonSource(str(dataset / "train.json"), str(dataset / "images"))
    assert len(source) == json.loads((dataset / "dataset.json").read_text())["questions"]["train"] > 30
    record = source[0]
    assert record["image_bytes"] == (dataset / "images" / record["image"]).read_bytes()
    truth = [json.loads(line) for line in (dataset / "test_ground_truth.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (dataset / "test_questions.jsonl").read_text().splitlines()]
    assert len(truth) == len(questions) == 40
    assert {t["question_type"] for t in truth} == {"colour"}
    assert all(len(t["bbox"]) == 4 for t in truth)
    manifest = json.loads((dataset / "dataset.json").read_text())
    assert manifest["generator"] == "meteor_jax.data.board"
    assert manifest["questions"]["test"] == 40
    assert manifest["args"]["train_cells"] == [1, 2, 4, 8, 16, 32, 64]


def test_ensure_dataset_reuses_its_own_and_refuses_another(dataset, tmp_path):
    before = _files(dataset)
    board.ensure_dataset(dataset, num_train=30, num_test=10, seed=2, progress=False)
    assert _files(dataset) == before
    with pytest.raises(ValueError, match="made by meteor_jax.data.board with .*'seed': 2"):
        board.ensure_dataset(dataset, num_train=30, num_test=10, seed=3, progress=False)
    shapes.generate(tmp_path / "shapes", num_train=2, num_test=1, seed=0, progress=False)
    with pytest.raises(ValueError, match="made by meteor_jax.data.shapes"):  # a shapes set is never read as a board
        board.ensure_dataset(tmp_path / "shapes", num_train=2, num_test=1, seed=0, progress=False)


def test_config_board_generates_its_dataset_and_every_sample_fits(tmp_path, monkeypatch):
    from configs import shapes as shapes_config

    monkeypatch.setattr(shapes_config, "NUM_TRAIN", 20)
    monkeypatch.setattr(shapes_config, "NUM_TEST", 5)
    config = shapes_config.get_config(f"board:{tmp_path}/board")
    assert json.loads((tmp_path / "board" / "dataset.json").read_text())["generator"] == "meteor_jax.data.board"
    assert config.data.feature_cache == 80  # room for every training record (at most 4 questions per image)
    assert_every_sample_fits(config)


def test_cli_writes_the_dataset_and_names_bad_arguments(tmp_path, capsys):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "meteor_jax.data.board", "--out", str(out), "--train", "3",
                             "--test", "2", "--grid", "4", "--image_size", "32", "--questions_per_image", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"wrote \d train and 4 test questions", result.stdout)
    assert "board train" in result.stderr  # the progress bar
    assert Image.open(out / "images" / "test_000001.png").size == (32, 32)
    for args, message in ((["--grid", "1"], "--grid must be at least 2"),
                          (["--image_size", "60"], "--image_size must be a multiple of --grid"),
                          (["--questions_per_image", "65"], r"--questions_per_image must be in \[1, 64\]"),
                          (["--seed", "-1"], "--seed must be >= 0"),
                          (["--train_cells", "0,4"], r"--train_cells must be .* in \[1, 64\]"),
                          (["--grid", "4", "--image_size", "32", "--test_cells", "17"],
                           r"--test_cells must be .* in \[1, 16\]"),
                          (["--train_cells", "1,x"], "expected comma-separated integers")):
        with pytest.raises(SystemExit) as e:
            board.main(["--out", str(tmp_path / "x"), "--train", "2", "--test", "1", "--quiet", *args])
        assert e.value.code == 2
        assert re.search(message, capsys.readouterr().err)
        assert not (tmp_path / "x").exists()
