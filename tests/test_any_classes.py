"""Datasets whose classes are not expressions: ImageFolder order, rafdb-compound, noise, every output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dnfer.data.registry_builtins  # noqa: F401
from dnfer.analysis.audit import audit_run
from dnfer.cli import main as cli_main
from dnfer.config import Config
from dnfer.data.base import FERDataset
from dnfer.data.classes import (
    CANONICAL_CLASSES,
    order_class_names,
    parse_class_selection,
    select_classes,
)
from dnfer.data.noise import apply_noise, asymmetric_matrix, load_transition_matrix
from dnfer.data.pipeline import prepare_data
from dnfer.data.rafdb import COMPOUND_CLASSES
from dnfer.data.records import remap_classes
from dnfer.engine.checkpoint import load_checkpoint
from dnfer.engine.trainer import fit
from dnfer.errors import ConfigError, DataError
from dnfer.registry import DATASETS

S = 8


def load(name: str, path: Path, *, seed: int = 1, **options: str) -> FERDataset:
    return DATASETS.get(name)(path, image_size=S, options=dict(options), seed=seed, skip_bad=False)


def save_png(path: Path, rgb: tuple[int, int, int], size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)
    return path


# ---------------------------------------------------------------- class order


def test_order_class_names_expressions_open_and_numeric() -> None:
    classes, to_class = order_class_names(["Happy", "sad", "happiness", "Surprised"])
    assert classes == ["surprise", "happiness", "sadness"]  # canonical order, synonyms merged
    assert to_class["Happy"] == to_class["happiness"] == "happiness"
    names = [str(i) for i in range(11)]
    classes, to_class = order_class_names(reversed(names))
    assert classes == sorted(names) == ["0", "1", "10", "2", "3", "4", "5", "6", "7", "8", "9"]  # as ImageFolder
    assert to_class == {n: n for n in names}
    classes, to_class = order_class_names(["10", "2", "02", "0"], numeric=True)
    assert classes == ["0", "2", "10"] and to_class["02"] == "2"
    # one non-expression name makes the whole list an open taxonomy, kept as written
    assert order_class_names(["happy", "bored", "Zebra"])[0] == ["Zebra", "bored", "happy"]
    with pytest.raises(DataError, match=r"'bored' are not expression names"):
        order_class_names(["happy", "bored"], taxonomy="expressions")
    with pytest.raises(DataError, match="empty class name"):
        order_class_names(["cat", " "])


def test_class_selection_on_an_open_taxonomy() -> None:
    classes, mapping = parse_class_selection("dog,pet=cat+bird", ["bird", "cat", "dog"])
    assert classes == ["dog", "pet"] and mapping == {"dog": "dog", "cat": "pet", "bird": "pet"}
    with pytest.raises(ConfigError, match="'Cat' is not in this dataset; its classes are bird, cat, dog"):
        parse_class_selection("Cat,dog", ["bird", "cat", "dog"])  # open names match as written
    assert parse_class_selection("happy,sad", ["happiness", "sadness", "anger"])[0] == ["happiness", "sadness"]
    # a checkpoint's class list is matched without parsing, so names may hold commas
    assert select_classes(["a,b", "c"], ["c", "a,b", "d"]) == (["a,b", "c"], {"a,b": "a,b", "c": "c"})
    with pytest.raises(ConfigError, match="'e' are not in this dataset"):
        select_classes(["e"], ["c", "d"])


def test_remap_classes_keeps_open_names() -> None:
    from dnfer.data.base import Split

    def split(labels: list[int]) -> Split:
        return Split(np.zeros((len(labels), 2, 2, 3), np.uint8), np.array(labels), [f"s{i}" for i in range(len(labels))])

    ds = FERDataset(["bird", "cat", "dog"], split([0, 1, 2, 2]), split([0, 1, 2]))
    out = remap_classes(ds, ["dog", "pet"], {"dog": "dog", "cat": "pet", "bird": "pet"})
    assert out.class_names == ["dog", "pet"]
    assert [out.class_names[y] for y in out.train.labels] == ["pet", "pet", "dog", "dog"]


# ---------------------------------------------------------------- folder / csv


def test_folder_numeric_names_sort_lexicographically_like_imagefolder(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    for d in range(11):
        for i in range(3):
            save_png(root / str(d) / f"{i}.png", (d * 20, i * 40, 0))
    ds = load("folder", root, test_ratio="0.34")
    assert ds.class_names == ["0", "1", "10", "2", "3", "4", "5", "6", "7", "8", "9"]
    for sp in ds.splits().values():  # every sample's class is its folder
        assert all(ds.class_names[y] == n.split("/")[0] for y, n in zip(sp.labels, sp.names, strict=True))
    assert ds.meta["counts"]["train"]["per_class"]["10"] == 2
    with pytest.raises(DataError, match=r"digits: folder\(s\) '0', '1', '10'.* are not expression names"):
        load("folder", root, taxonomy="expressions")


def test_folder_split_layout_maps_every_split_with_one_class_list(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    for split, classes in (("train", ("cat", "dog", "Happy")), ("test", ("Happy", "cat"))):
        for c in classes:
            save_png(root / split / c / "a.png", (len(c) * 30, 0, 0))
    ds = load("folder", root)
    # test alone holds one expression name and one other: still the names as written, not canonicalised
    assert ds.class_names == ["Happy", "cat", "dog"]
    assert [ds.class_names[y] for y in ds.test.labels] == ["Happy", "cat"]


def test_csv_open_labels_strings_and_integers(tmp_path: Path) -> None:
    for i in range(6):
        save_png(tmp_path / "img" / f"{i}.png", (i * 40, 0, 0))
    f = tmp_path / "list.csv"
    f.write_text("path,label,split\n" + "".join(
        f"img/{i}.png,{lab},{'train' if i < 4 else 'test'}\n" for i, lab in enumerate(["10", "2", "0", "2", "10", "0"])))
    ds = load("csv", f)
    assert ds.class_names == ["0", "2", "10"]  # integer labels keep numeric order
    assert [ds.class_names[y] for y in ds.train.labels] == ["10", "2", "0", "2"]
    f.write_text("path,label\n" + "".join(f"img/{i}.png,{lab}\n" for i, lab in enumerate(["pain", "no pain"] * 3)))
    ds = load("csv", f, test_ratio="0.34")
    assert ds.class_names == ["no pain", "pain"]
    assert sorted(ds.meta["counts"]["test"]["per_class"].values()) == [1, 1]
    f.write_text("path,label\nimg/0.png,pain\nimg/1.png,\n")
    with pytest.raises(DataError, match=r"list.csv:3: empty label"):
        load("csv", f)


# ---------------------------------------------------------------- rafdb-compound


def write_compound(root: Path, rows: list[tuple[str, int]], images: str = "aligned") -> Path:
    """Fake RAF-DB compound release: EmoLabel/list_patition_label.txt and Image/<images>/."""
    for name, lab in rows:
        stem = name[:-4]
        file = f"{stem}_aligned.jpg" if images == "aligned" else name
        img = Image.new("RGB", (20, 20), (lab * 20, 0, 0))
        (root / "Image" / images).mkdir(parents=True, exist_ok=True)
        img.save(root / "Image" / images / file, "JPEG")
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("".join(f"{n} {lab}\n" for n, lab in rows))
    return root


COMPOUND_ROWS = [(f"train_{i + 1:04d}.jpg", i % 11 + 1) for i in range(22)] + [("test_0001.jpg", 11), ("test_0002.jpg", 3)]


def test_rafdb_compound_reads_the_release_layout(tmp_path: Path) -> None:
    root = write_compound(tmp_path / "RAF-DB" / "compound", COMPOUND_ROWS)
    assert len(COMPOUND_CLASSES) == 11 and COMPOUND_CLASSES[0] == "happily surprised"
    for path in (root, tmp_path / "RAF-DB", tmp_path):  # the set's folder or a parent of compound/
        ds = load("rafdb-compound", path)
        assert ds.class_names == list(COMPOUND_CLASSES)
        assert len(ds.train) == 22 and len(ds.test) == 2 and ds.val is None
    assert ds.train.names[0] == "train_0001.jpg" and ds.train.labels[0] == 0
    assert [ds.class_names[y] for y in ds.test.labels] == ["disgustedly surprised", "sadly fearful"]
    assert ds.meta["counts"]["train"]["per_class"] == {c: 2 for c in COMPOUND_CLASSES}
    assert abs(int(ds.test.images[0][..., 0].mean()) - 220) < 10  # the pixels of label 11's image
    original = write_compound(tmp_path / "orig", COMPOUND_ROWS, images="original")
    assert load("rafdb-compound", original, images="original").train.names == ds.train.names
    (root / "EmoLabel" / "list_patition_label.txt").write_text("train_0001.jpg 12\n")
    with pytest.raises(DataError, match=r"list_patition_label.txt:1: label 12 out of range 1..11"):
        load("rafdb-compound", root)


def test_noise_file_on_rafdb_compound_uses_its_own_label_order(tmp_path: Path) -> None:
    root = write_compound(tmp_path / "compound", COMPOUND_ROWS)
    noise = tmp_path / "noise.txt"
    flipped = {"train_0001.jpg": 5}  # happily surprised -> sadly surprised
    noise.write_text("".join(f"{n} {flipped.get(n, lab)}\n" for n, lab in COMPOUND_ROWS if n.startswith("train")))
    cfg = Config()
    cfg.data.spec, cfg.data.image_size, cfg.data.noise_file, cfg.data.val_fraction = f"rafdb-compound:{root}", S, str(noise), 0.0
    ds = prepare_data(cfg.data, seed=0, log=lambda _m: None)
    i = ds.train.names.index("train_0001.jpg")
    assert ds.class_names[ds.train.labels[i]] == "sadly surprised"
    assert ds.class_names[ds.train.true_labels[i]] == "happily surprised"
    assert int(ds.train.is_noisy.sum()) == 1


# ---------------------------------------------------------------- noise


def test_noise_on_an_open_taxonomy(tmp_path: Path) -> None:
    labels = np.repeat(np.arange(3), 200)
    res = apply_noise(labels, "symmetric:0.3", class_names=["cat", "dog", "emu"], seed=0)
    assert 0.25 < res.realised_rate < 0.35 and set(np.unique(res.noisy_labels)) == {0, 1, 2}
    with pytest.raises(ConfigError, match=r"classes cat, dog, emu are not all expression names; pass a KxK "
                                          r"transition matrix \(train: --noise-matrix FILE"):
        apply_noise(labels, "asymmetric:0.3", class_names=["cat", "dog", "emu"], seed=0)
    assert asymmetric_matrix(["cat", "dog"], 0.3, confusable={"cat": "dog"})[0, 1] == pytest.approx(0.3)
    assert asymmetric_matrix(list(CANONICAL_CLASSES), 0.2).shape == (8, 8)  # expressions unchanged
    m = tmp_path / "m.txt"
    m.write_text("0.8 0.2\n0.1 0.9\n")
    assert load_transition_matrix(m, ["cat", "dog"]) == pytest.approx(np.array([[0.8, 0.2], [0.1, 0.9]]))
    with pytest.raises(ConfigError, match=r"m.txt: expected a 3x3 matrix \(rows and columns in class order cat, dog, emu\)"):
        load_transition_matrix(m, ["cat", "dog", "emu"])
    m.write_text("0.8 0.3\n0.1 0.9\n")
    with pytest.raises(ConfigError, match="each row must sum to 1"):
        load_transition_matrix(m, ["cat", "dog"])
    cfg = Config()
    cfg.data.noise, cfg.data.noise_matrix = "symmetric:0.2", str(m)
    with pytest.raises(ConfigError, match="give one of --noise, --noise-file, --noise-matrix, not --noise and --noise-matrix"):
        cfg.validate()


# ---------------------------------------------------------------- end to end


def make_pets(root: Path, per_class: int = 16, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for name, rgb in (("cat", (220, 60, 60)), ("dog", (60, 60, 220))):
        for i in range(per_class):
            img = np.array(rgb, float)[None, None] + rng.normal(0, 20, (size, size, 3))
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{name}_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def pets_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DNFER, one epoch, tiny_cnn at 16 px on cat/dog folders with labels drawn from a transition matrix."""
    tmp = tmp_path_factory.mktemp("pets")
    data = make_pets(tmp / "pets")
    matrix = tmp / "flip.txt"
    matrix.write_text("0.75 0.25\n0.25 0.75\n")
    cfg = Config()
    cfg.data.spec, cfg.data.image_size, cfg.data.noise_matrix = f"folder:{data}", 16, str(matrix)
    cfg.model.name = "tiny_cnn"
    cfg.method.params = {"warmup_epochs": 0}
    cfg.train.epochs, cfg.train.batch_size, cfg.train.precision, cfg.train.threads = 1, 16, "fp32", 1
    cfg.train.progress = False
    cfg.out = str(tmp / "run")
    fit(cfg, log=lambda _m: None)
    return Path(cfg.out)


def test_open_taxonomy_trains_audits_reports_predicts_and_exports(
    pets_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classes = ["cat", "dog"]
    summary = json.loads((pets_run / "summary.json").read_text())
    assert summary["class_names"] == classes
    assert (pets_run / "config.yaml").read_text().count("noise_matrix:") == 1
    ckpt = load_checkpoint(pets_run / "last.pt")
    assert list(ckpt.class_names) == classes and ckpt.config["data"]["noise_matrix"].endswith("flip.txt")

    assert cli_main(["audit", "--run", str(pets_run), "--out", str(tmp_path / "issues.csv"), "--top", "2"]) == 0
    rows = list(csv.DictReader((tmp_path / "issues.csv").open()))
    assert len(rows) == len(audit_run(pets_run).names) and {r["given_label"] for r in rows} == set(classes)
    assert {r["suggested_label"] for r in rows} <= set(classes)

    assert cli_main(["report", str(pets_run), "--out", str(tmp_path / "r.html"), "--top", "4"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "2 classes" in page
    assert "<span class='given'>cat</span>" in page or "<span class='given'>dog</span>" in page

    img = pets_run.parent / "pets" / "dog" / "dog_00.png"
    capsys.readouterr()
    assert cli_main(["predict", "--checkpoint", str(pets_run / "last.pt"), str(img), "--no-detect", "-q"]) == 0
    face = json.loads(capsys.readouterr().out.splitlines()[0])["faces"][0]
    assert set(face["probabilities"]) == set(classes) and face["label"] in classes

    onnx_path = tmp_path / "pets.onnx"
    assert cli_main(["export", "--checkpoint", str(pets_run / "last.pt"), "--format", "onnx",
                     "--out", str(onnx_path), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["class_names"] == classes
    assert cli_main(["predict", "--onnx", str(onnx_path), str(img), "--no-detect", "-q"]) == 0
    assert set(json.loads(capsys.readouterr().out.splitlines()[0])["faces"][0]["probabilities"]) == set(classes)

    assert cli_main(["eval", "--checkpoint", str(pets_run / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert "cat" in out and "dog" in out


def test_open_taxonomy_asymmetric_noise_is_one_clear_cli_error(pets_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = pets_run.parent / "pets"
    assert cli_main(["train", "--data", f"folder:{data}", "--noise", "asymmetric:0.2", "--model", "tiny_cnn",
                     "--image-size", "16", "--epochs", "1", "--warmup-epochs", "0",
                     "--out", str(pets_run.parent / "asym")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cat, dog are not all expression names" in err[0] and "--noise-matrix FILE" in err[0]



def test_noise_command_on_rafdb_compound_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dnfer.data.noise import read_label_file

    root = write_compound(tmp_path / "compound", COMPOUND_ROWS)
    labels = root / "EmoLabel" / "list_patition_label.txt"
    out = tmp_path / "noise50.txt"
    assert cli_main(["noise", "--labels", str(labels), "--out", str(out), "--noise", "symmetric:0.5",
                     "--classes", "compound", "--seed", "3"]) == 0
    clean = read_label_file(labels, num_file_classes=11, file_classes=COMPOUND_CLASSES)
    noisy = read_label_file(out, num_file_classes=11, file_classes=COMPOUND_CLASSES)
    assert list(noisy) == [n for n, _ in COMPOUND_ROWS if n.startswith("train")]  # train rows, file order
    flipped = sum(noisy[n] != clean[n] for n in noisy)
    assert 0 < flipped < len(noisy) and f"{flipped} of {len(noisy)} labels flipped" in capsys.readouterr().out
    assert cli_main(["noise", "--labels", str(labels), "--out", str(out), "--noise", "asymmetric:0.5",
                     "--classes", "compound", "--overwrite"]) == 2
    assert "dnfer noise: --transition FILE" in capsys.readouterr().err
    assert cli_main(["noise", "--labels", str(labels), "--out", str(out), "--noise", "symmetric:0.5",
                     "--overwrite"]) == 2
    assert "out of range 1..8" in capsys.readouterr().err  # labels 9..11 are not RAF basic labels


def test_plots_print_class_names_literally() -> None:
    from dnfer.analysis.report import plot_per_class_accuracy
    from dnfer.analysis.tensorboard import confusion_figure

    names = ["$5-$10", "$x^$"]  # mathtext would fail on these
    fig = confusion_figure(np.eye(2, dtype=int), names)
    fig.savefig(__import__("io").BytesIO(), format="png")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [r"\$5-\$10", r"\$x^\$"]
    record = {"epoch": 1, "test_per_class_acc": [0.5, 1.0]}
    assert (plot_per_class_accuracy(record, names) or "").startswith("data:image/png")
