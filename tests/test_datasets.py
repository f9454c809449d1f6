"""Dataset adapters on tiny fixtures in each exact format, robust decoding, class remapping."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dnfer.data.affectnet  # noqa: F401 - registers the adapters
import dnfer.data.csvfile  # noqa: F401
import dnfer.data.fer2013  # noqa: F401
import dnfer.data.folder  # noqa: F401
import dnfer.data.rafdb  # noqa: F401
from dnfer.data.base import FERDataset, IndexedImages, Split
from dnfer.data.classes import BASIC7, CANONICAL_CLASSES
from dnfer.data.decode import DecodeError, decode_image
from dnfer.data.fer2013 import majority_label
from dnfer.data.noise import read_label_file
from dnfer.data.records import decode_records, remap_classes
from dnfer.errors import ConfigError, DataError
from dnfer.registry import DATASETS

S = 8  # output size used throughout


def load(name: str, path: Path, *, size: int = S, skip_bad: bool = False, seed: int = 1, **options: str) -> FERDataset:
    return DATASETS.get(name)(path, image_size=size, options=dict(options), seed=seed, skip_bad=skip_bad)


def save(path: Path, img: Image.Image, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return path


def solid(color: tuple[int, int, int], size: int = 12) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def jpeg_bytes(color: tuple[int, int, int] = (10, 200, 30), size: int = 32) -> bytes:
    buf = io.BytesIO()
    solid(color, size).save(buf, "JPEG")
    return buf.getvalue()


def awkward_images(folder: Path) -> dict[str, Path]:
    """Good-but-awkward images (each decodes) keyed by kind."""
    out = {
        "gray": save(folder / "gray.png", Image.new("L", (10, 14), 100)),
        "rgba": save(folder / "rgba.png", Image.new("RGBA", (12, 12), (200, 100, 50, 0))),
        "la": save(folder / "la.png", Image.new("LA", (12, 12), (90, 255))),
        "i16": save(folder / "i16.png", Image.fromarray(np.full((12, 12), 200 * 257, np.uint16))),
        "cmyk": save(folder / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0))),
        "palette": save(folder / "pal.png", solid((0, 0, 255)).convert("P")),
        "rgb": save(folder / "rgb.jpg", solid((250, 250, 0))),
    }
    return out


def broken_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    zero = folder / "zero.jpg"
    zero.write_bytes(b"")
    trunc = folder / "trunc.jpg"
    trunc.write_bytes(jpeg_bytes()[:200])
    text = folder / "text.jpg"
    text.write_text("this is not an image\n")
    return {"zero": zero, "trunc": trunc, "text": text}


# --- decoding ------------------------------------------------------------------------------------


def test_decode_converts_every_mode_to_rgb_uint8(tmp_path: Path) -> None:
    imgs = awkward_images(tmp_path)
    got = {k: decode_image(p, size=S) for k, p in imgs.items()}
    for k, a in got.items():
        assert a.shape == (S, S, 3) and a.dtype == np.uint8, k
    assert (got["gray"] == 100).all()
    assert (got["rgba"] == 0).all()  # alpha 0 composited on black
    assert (got["la"] == 90).all()
    assert (got["i16"] == 200).all()  # 16-bit scaled by 1/257, not clipped to 255
    assert (np.abs(got["cmyk"].astype(int) - [255, 0, 0]) <= 2).all()
    assert (got["palette"] == [0, 0, 255]).all()
    assert (np.abs(got["rgb"].astype(int) - [250, 250, 0]) <= 3).all()


def test_decode_inline_pixels_and_float_arrays() -> None:
    gray = np.full((48, 48), 77, np.uint8)
    assert (decode_image(gray, size=S) == 77).all()
    assert (decode_image(np.full((5, 5, 3), 0.5), size=S) == 128).all()


def test_decode_errors_have_reasons(tmp_path: Path) -> None:
    bad = broken_images(tmp_path)
    reasons = {}
    for k, p in bad.items():
        with pytest.raises(DecodeError) as e:
            decode_image(p, size=S)
        reasons[k] = e.value.reason
    assert reasons["zero"] == "zero-byte file"
    assert "truncated" in reasons["trunc"]
    assert "not an image" in reasons["text"]
    with pytest.raises(DecodeError, match="file not found"):
        decode_image(tmp_path / "nope.jpg", size=S)


def test_crop_box_selects_the_face_region(tmp_path: Path) -> None:
    a = np.zeros((30, 40, 3), np.uint8)
    a[5:25, 10:30] = (255, 0, 0)  # the "face": x=10, y=5, w=20, h=20
    p = save(tmp_path / "a.png", Image.fromarray(a))
    out = decode_image(p, size=S, box=(10, 5, 20, 20))
    assert (out == [255, 0, 0]).all()
    # a box past the border is clipped, one fully outside is an error
    assert decode_image(p, size=S, box=(30, 20, 50, 50)).shape == (S, S, 3)
    with pytest.raises(DecodeError, match="outside"):
        decode_image(p, size=S, box=(100, 100, 5, 5))


def test_reduced_scale_jpeg_decode_keeps_the_crop(tmp_path: Path) -> None:
    a = np.zeros((400, 600, 3), np.uint8)
    a[100:300, 200:400] = (0, 255, 0)
    p = save(tmp_path / "big.jpg", Image.fromarray(a), "JPEG")
    out = decode_image(p, size=16, box=(200, 100, 200, 200))  # 200 px crop -> DCT scale 1/4
    full = Image.open(p).convert("RGB").crop((200, 100, 400, 300)).resize((16, 16), Image.Resampling.BILINEAR)
    diff = np.abs(out.astype(int) - np.asarray(full, int))
    assert diff.max() <= 12 and diff.mean() < 2


def test_parallel_decoding_is_deterministic(tmp_path: Path) -> None:
    from dnfer.data.records import Record

    recs = [Record(name=str(i), label=0, split="train", file=str(p))
            for i, p in enumerate(list(awkward_images(tmp_path).values()) * 3)]
    serial = [x for _, x, _ in decode_records(recs, image_size=S, workers=1, chunk=4)]
    parallel = [x for _, x, _ in decode_records(recs, image_size=S, workers=2, chunk=4)]
    assert np.array_equal(np.concatenate(serial), np.concatenate(parallel))


# --- RAF-DB --------------------------------------------------------------------------------------


def make_raf(root: Path, rows: list[tuple[str, int]], *, aligned: bool = True) -> Path:
    lines = []
    for name, lab in rows:
        lines.append(f"{name} {lab}")
        stem = name.rsplit(".", 1)[0]
        fname = f"{stem}_aligned.jpg" if aligned else name
        save(root / "Image" / "aligned" / fname, solid((lab * 30, 0, 0)), "JPEG")
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root


RAF_ROWS = [("train_00001.jpg", 4), ("train_00002.jpg", 1), ("train_00003.jpg", 7), ("train_00004.jpg", 4),
            ("test_0001.jpg", 4), ("test_0002.jpg", 6)]


def test_rafdb_counts_names_and_labels(tmp_path: Path) -> None:
    ds = load("rafdb", make_raf(tmp_path / "RAF", RAF_ROWS))
    assert ds.class_names == list(BASIC7)
    assert ds.train.names == ["train_00001.jpg", "train_00002.jpg", "train_00003.jpg", "train_00004.jpg"]
    assert [ds.class_names[y] for y in ds.train.labels] == ["happiness", "surprise", "neutral", "happiness"]
    assert len(ds.test) == 2 and ds.val is None
    assert ds.train.images.shape == (4, S, S, 3)
    assert ds.meta["counts"]["train"]["per_class"]["happiness"] == 2
    # a community noise file (same names, 1-based RAF labels) matches the training names
    noise = tmp_path / "noise01.txt"
    noise.write_text("train_00001.jpg 1\ntrain_00002.jpg 1\ntrain_00003.jpg 7\ntrain_00004.jpg 4\n")
    table = read_label_file(noise)
    assert set(table) == set(ds.train.names)


def test_rafdb_accepts_basic_parent_and_unaligned_names(tmp_path: Path) -> None:
    make_raf(tmp_path / "RAF" / "basic", RAF_ROWS, aligned=False)
    assert len(load("rafdb", tmp_path / "RAF").train) == 4


@pytest.mark.parametrize(
    ("line", "match"),
    [("train_00009.jpg 9", r"list_patition_label.txt:7: label 9 out of range 1..7"),
     ("train_00001.jpg 2", r"duplicate sample name.*train_00001.jpg.*:1 and .*:7"),
     ("val_0001.jpg 2", r":7: name 'val_0001.jpg' starts neither"),
     ("train_00009.jpg x", r":7: expected 'name label'")],
)
def test_rafdb_bad_lines_name_the_line(tmp_path: Path, line: str, match: str) -> None:
    root = make_raf(tmp_path / "RAF", RAF_ROWS)
    lf = root / "EmoLabel" / "list_patition_label.txt"
    lf.write_text(lf.read_text() + line + "\n")
    with pytest.raises(DataError, match=match):
        load("rafdb", root)


def test_rafdb_empty_split_and_unknown_option(tmp_path: Path) -> None:
    root = make_raf(tmp_path / "RAF", RAF_ROWS[:4])
    with pytest.raises(DataError, match="split 'test' is empty"):
        load("rafdb", root)
    with pytest.raises(ConfigError, match="valid keys: images"):
        load("rafdb", make_raf(tmp_path / "R2", RAF_ROWS), colour="x")


def test_bad_images_one_error_listing_all_or_skipped(tmp_path: Path) -> None:
    root = make_raf(tmp_path / "RAF", RAF_ROWS)
    img = root / "Image" / "aligned"
    (img / "train_00002_aligned.jpg").write_bytes(b"")
    (img / "train_00003_aligned.jpg").write_bytes(jpeg_bytes()[:150])
    (img / "test_0002_aligned.jpg").unlink()
    with pytest.raises(DataError) as e:
        load("rafdb", root)
    msg = str(e.value)
    assert "3 of 6 images cannot be read" in msg and "--skip-bad" in msg
    for name in ("train_00002_aligned.jpg", "train_00003_aligned.jpg", "test_0002_aligned.jpg"):
        assert name in msg
    assert "zero-byte" in msg and "truncated" in msg and "file not found" in msg
    ds = load("rafdb", root, skip_bad=True)
    assert len(ds.train) == 2 and len(ds.test) == 1
    assert ds.meta["num_skipped"] == 3
    assert {Path(s["file"]).name for s in ds.meta["skipped"]} == {
        "train_00002_aligned.jpg", "train_00003_aligned.jpg", "test_0002_aligned.jpg"}


# --- FER2013 / FERPlus --------------------------------------------------------------------------

COLS = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF"]


@pytest.mark.parametrize(
    ("votes", "expected"),
    [([0, 8, 1, 1, 0, 0, 0, 0, 0, 0], "happiness"),  # 1-vote columns are outliers
     ([3, 0, 0, 0, 0, 0, 0, 0, 0, 2], "neutral"),  # 3 > 5/2
     ([4, 4, 2, 0, 0, 0, 0, 0, 0, 0], None),  # no strict majority
     ([2, 2, 1, 1, 1, 1, 1, 1, 0, 0], None),  # 2 of 4 remaining is not more than half
     ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], None),  # everything removed
     ([0, 0, 0, 0, 0, 0, 0, 0, 6, 4], None),  # unknown wins -> dropped
     ([0, 2, 0, 0, 0, 0, 0, 0, 0, 8], None),  # NF wins -> dropped
     ([0, 0, 0, 0, 0, 0, 0, 7, 0, 3], "contempt")],
)
def test_ferplus_majority_rule(votes: list[int], expected: str | None) -> None:
    top = majority_label(np.array(votes, float))
    assert (None if top is None else COLS[top]) == expected


def make_fer(root: Path, rows: list[tuple[int, str, list[int], str]], *, bad_pixels_row: int | None = None) -> Path:
    """rows: (fer2013 emotion, Usage, FERPlus votes, image name)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "fer2013.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for i, (emo, usage, _, _) in enumerate(rows):
            px = " ".join(str((i * 10 + j) % 256) for j in range(48 * 48 - (5 if i == bad_pixels_row else 0)))
            w.writerow([emo, px, usage])
    with open(root / "fer2013new.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Usage", "Image name", *COLS])
        for _, usage, votes, name in rows:
            w.writerow([usage, name, *votes])
    return root


def v(col: str, n: int = 8) -> list[int]:
    out = [0] * 10
    out[COLS.index(col)] = n
    out[(COLS.index(col) + 1) % 8] += 10 - n
    return out


FER_ROWS = [
    (3, "Training", v("happiness"), "fer0000000.png"),
    (0, "Training", v("anger", 6), "fer0000001.png"),
    (6, "Training", [0, 0, 0, 0, 0, 0, 0, 0, 6, 4], "fer0000002.png"),  # unknown -> dropped
    (6, "Training", v("contempt"), "fer0000003.png"),
    (4, "Training", v("neutral"), ""),  # no name -> dropped
    (5, "PublicTest", v("surprise"), "fer0000005.png"),
    (2, "PrivateTest", v("fear"), "fer0000006.png"),
    (1, "PrivateTest", v("disgust"), "fer0000007.png"),
]


def test_ferplus_protocol_counts_and_soft_labels(tmp_path: Path) -> None:
    root = make_fer(tmp_path / "ferplus", FER_ROWS)
    ds = load("ferplus", root, soft_labels="true")
    assert ds.class_names == list(CANONICAL_CLASSES)  # 8 classes, canonical order
    assert ds.train.names == ["fer0000000.png", "fer0000001.png", "fer0000003.png"]
    assert [ds.class_names[y] for y in ds.train.labels] == ["happiness", "anger", "contempt"]
    assert ds.val is not None and ds.val.names == ["fer0000005.png"]
    assert len(ds.test) == 2
    assert ds.meta["dropped_rows"] == {"no_name": 1, "unknown_nf_or_no_majority": 1, "contempt": 0}
    soft = np.concatenate([ds.train.soft_labels, ds.val.soft_labels, ds.test.soft_labels])
    labels = np.concatenate([ds.train.labels, ds.val.labels, ds.test.labels])
    assert np.allclose(soft.sum(1), 1.0) and (soft.argmax(1) == labels).all()
    # anger has 6 votes and disgust (next column) 4: soft = 0.6 / 0.4 in canonical columns
    anger = ds.train.soft_labels[1]
    assert anger[ds.class_names.index("anger")] == pytest.approx(0.6)
    assert anger[ds.class_names.index("disgust")] == pytest.approx(0.4)
    # pixels are the fer2013.csv row's (row 0: values 0..2303 mod 256 at 48x48, resized)
    direct = decode_image(np.array([j % 256 for j in range(2304)], np.uint8).reshape(48, 48), size=S)
    assert np.array_equal(ds.train.images[0], direct)


def test_ferplus_seven_classes_and_train_plus_valid(tmp_path: Path) -> None:
    root = make_fer(tmp_path / "ferplus", FER_ROWS)
    ds = load("ferplus", root, classes="7", train_on="train+valid")
    assert ds.class_names == list(BASIC7)
    assert ds.val is None
    assert ds.train.names == ["fer0000000.png", "fer0000001.png", "fer0000005.png"]
    assert ds.meta["dropped_rows"]["contempt"] == 1
    assert ds.train.soft_labels is None


def test_ferplus_misaligned_files_and_bad_pixels(tmp_path: Path) -> None:
    root = make_fer(tmp_path / "a", FER_ROWS, bad_pixels_row=0)
    with pytest.raises(DataError, match=r"fer2013new.csv:2 \(.*fer2013.csv:2: pixels field has 2299 values"):
        load("ferplus", root)
    ds = load("ferplus", root, skip_bad=True)
    assert ds.meta["skipped"][0]["file"].endswith("fer2013new.csv:2") and len(ds.train) == 2
    root = make_fer(tmp_path / "b", FER_ROWS)
    with open(root / "fer2013new.csv", "a") as f:
        f.write("Training,fer0000009.png,0,10,0,0,0,0,0,0,0,0\n")
    with pytest.raises(DataError, match="9 rows but .* has 8"):
        load("ferplus", root)


def test_fer2013_maps_by_name_and_checks_lines(tmp_path: Path) -> None:
    root = make_fer(tmp_path / "fer", FER_ROWS)
    ds = load("fer2013", root / "fer2013.csv")
    assert ds.class_names == list(BASIC7)
    assert len(ds.train) == 5 and len(ds.val) == 1 and len(ds.test) == 2
    # FER2013 emotion 3 = Happy, 0 = Angry, 6 = Neutral, 5 = Surprise
    assert [ds.class_names[y] for y in ds.train.labels[:2]] == ["happiness", "anger"]
    assert ds.class_names[ds.val.labels[0]] == "surprise"
    lines = (root / "fer2013.csv").read_text().splitlines()
    lines[3] = "9" + lines[3][1:]
    (root / "fer2013.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"fer2013.csv:4: emotion '9' out of range"):
        load("fer2013", root)


# --- AffectNet ----------------------------------------------------------------------------------

AFF_HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
              "expression", "valence", "arousal"]


def face_image(color: tuple[int, int, int], box: tuple[int, int, int, int]) -> Image.Image:
    a = np.full((40, 50, 3), 255, np.uint8)
    x, y, w, h = box
    a[y : y + h, x : x + w] = color
    return Image.fromarray(a)


def make_affectnet_csv(root: Path, rows: dict[str, list[tuple[str, int, tuple[int, int, int, int]]]]) -> Path:
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True, exist_ok=True)
    for fname, items in rows.items():
        with open(lists / fname, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(AFF_HEADER)
            for i, (rel, expr, box) in enumerate(items):
                save(root / "Manually_Annotated_Images" / rel, face_image((expr * 20, 100, 0), box), "PNG")
                w.writerow([rel, *box, "1;2;3", expr, 0.1, 0.2][:6] + [expr, 0.1, 0.2] if i >= 0 else [])
    return root


AFF_ROWS = {
    "training.csv": [("1/a.png", 1, (10, 5, 20, 20)), ("1/b.png", 0, (0, 0, 30, 30)), ("2/c.png", 7, (5, 5, 10, 10)),
                     ("2/d.png", 8, (5, 5, 10, 10)), ("2/e.png", 6, (20, 10, 25, 25))],
    "validation.csv": [("3/f.png", 3, (1, 1, 12, 12)), ("3/g.png", 7, (1, 1, 12, 12))],
}


def test_affectnet_csv_release_maps_by_name_and_crops(tmp_path: Path) -> None:
    root = make_affectnet_csv(tmp_path / "AffectNet", AFF_ROWS)
    ds = load("affectnet", root)
    assert ds.class_names == list(BASIC7)
    assert ds.train.names == ["1/a.png", "1/b.png", "2/e.png"]
    # AffectNet "Happy" = 1 ends as canonical happiness, "Anger" = 6 as anger
    assert [ds.class_names[y] for y in ds.train.labels] == ["happiness", "neutral", "anger"]
    assert ds.meta["dropped_rows"] == {"contempt": 2, "none": 1}
    assert ds.val is None and ds.test.names == ["3/f.png"]
    # the crop is exactly the face box: every pixel has the face colour
    assert (ds.train.images[0] == [20, 100, 0]).all()
    assert (ds.train.images[2] == [120, 100, 0]).all()
    ds8 = load("affectnet", root, classes="8")
    assert ds8.class_names == list(CANONICAL_CLASSES)
    assert ds8.train.names == ["1/a.png", "1/b.png", "2/c.png", "2/e.png"]
    assert ds8.class_names[ds8.test.labels[1]] == "contempt"
    uncropped = load("affectnet", root, crop="false")
    assert not (uncropped.train.images[0] == [20, 100, 0]).all()


def test_affectnet_bad_expression_and_missing_image(tmp_path: Path) -> None:
    root = make_affectnet_csv(tmp_path / "AffectNet", AFF_ROWS)
    tr = root / "Manually_Annotated_file_lists" / "training.csv"
    (root / "Manually_Annotated_Images" / "1" / "b.png").unlink()
    with pytest.raises(DataError, match=r"1 of 4 images cannot be read: .*1/b.png \(file not found\)"):
        load("affectnet", root)
    with open(tr, "a") as f:
        f.write("4/z.png,1,1,5,5,x,12,0,0\n")
    with pytest.raises(DataError, match=r"training.csv:7: expression '12' out of range 0..10"):
        load("affectnet", root)


def test_affectnet_npy_release(tmp_path: Path) -> None:
    root = tmp_path / "AffectNetNPY"
    for sub, items in (("train_set", [("0", "1"), ("1", "6"), ("2", "9")]), ("val_set", [("0", "3"), ("10", "0")])):
        for stem, expr in items:
            save(root / sub / "images" / f"{stem}.jpg", solid((int(expr) * 20, 0, 0)), "JPEG")
            (root / sub / "annotations").mkdir(parents=True, exist_ok=True)
            np.save(root / sub / "annotations" / f"{stem}_exp.npy", np.array(expr))
    ds = load("affectnet", root)
    assert ds.train.names == ["0.jpg", "1.jpg"] and ds.test.names == ["0.jpg", "10.jpg"]
    assert [ds.class_names[y] for y in ds.train.labels] == ["happiness", "anger"]
    assert [ds.class_names[y] for y in ds.test.labels] == ["surprise", "neutral"]
    assert ds.meta["dropped_rows"] == {"uncertain": 1}


# --- SFEW / folder / csv ------------------------------------------------------------------------


def test_sfew_descends_into_aligned_folders_and_uses_val_as_test(tmp_path: Path) -> None:
    root = tmp_path / "SFEW_2"
    for split, n in (("Train", 3), ("Val", 2)):
        for cls in ("Happy", "Angry", "Surprise"):
            for i in range(n):
                save(root / split / f"{split}_Aligned_Faces" / cls / f"{cls}_{i}.png", solid((i, 0, 0)))
    (root / "Train" / "Train_Aligned_Faces" / "Happy" / "Thumbs.db").write_bytes(b"x")
    ds = load("sfew", root)
    assert ds.class_names == ["surprise", "happiness", "anger"]  # canonical order of the present classes
    assert len(ds.train) == 9 and len(ds.test) == 6 and ds.val is None
    assert "Happy/Happy_0.png" in ds.train.names
    assert ds.meta["num_ignored_files"] == 1 and ds.meta["ignored_files"][0].endswith("Thumbs.db")
    save(root / "Val" / "Val_Aligned_Faces" / "Bored" / "x.png", solid((0, 0, 0)))
    with pytest.raises(DataError, match=r"Val_Aligned_Faces: folder\(s\) 'Bored' are not expression names"):
        load("sfew", root)


def make_class_folders(root: Path, per_class: dict[str, int]) -> Path:
    for cls, n in per_class.items():
        for i in range(n):
            save(root / cls / f"{i:03d}.png", solid((i * 7 % 256, len(cls) * 9, 0)))
    return root


def test_folder_seeded_ratio_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "faces", {"happy": 10, "sad": 10, "neutral": 5})
    ds = load("folder", root, test_ratio="0.2", val_ratio="0.2", seed=3)
    assert ds.class_names == ["happiness", "sadness", "neutral"]
    assert len(ds.test) == 5 and len(ds.val) == 5 and len(ds.train) == 15
    assert ds.meta["counts"]["test"]["per_class"] == {"happiness": 2, "sadness": 2, "neutral": 1}
    again = load("folder", root, test_ratio="0.2", val_ratio="0.2", seed=3)
    other = load("folder", root, test_ratio="0.2", val_ratio="0.2", seed=4)
    assert again.test.names == ds.test.names and other.test.names != ds.test.names
    assert set(ds.train.names).isdisjoint(ds.test.names)
    with pytest.raises(ConfigError, match="valid keys"):
        load("folder", root, ratio="0.1")


def test_folder_split_layout_with_awkward_and_broken_images(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    awkward_images(root / "train" / "Happy")
    broken = broken_images(root / "train" / "Sad")
    save(root / "train" / "Sad" / "ok.png", solid((1, 2, 3)))
    save(root / "test" / "happy" / "t.png", solid((9, 9, 9)))
    save(root / "test" / "sad" / "t.png", solid((9, 9, 9)))
    with pytest.raises(DataError) as e:
        load("folder", root)
    for p in broken.values():
        assert str(p) in str(e.value)
    ds = load("folder", root, skip_bad=True)
    assert len(ds.train) == 8 and ds.meta["num_skipped"] == 3
    assert ds.class_names == ["happiness", "sadness"]
    # names are unique per split even when two splits share a file name
    assert ds.test.names == ["happy/t.png", "sad/t.png"]
    (root / "test" / "sad" / "t.png").unlink()
    (root / "test" / "happy" / "t.png").unlink()
    with pytest.raises(DataError, match="split 'test' is empty"), pytest.warns(UserWarning, match="holds no images"):
        load("folder", root, skip_bad=True)
    save(root / "extra" / "happy" / "x.png", solid((0, 0, 0)))
    with pytest.raises(DataError, match="has split folders and also 'extra'"):
        load("folder", root)


def test_csv_list_relative_paths_labels_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    for i in range(4):
        save(root / "img" / f"{i}.png", solid((i * 50, 0, 0)))
    f = root / "list.csv"
    f.write_text("path,label,split\nimg/0.png,Happy,train\nimg/1.png,sad,train\nimg/2.png,happiness,test\nimg/3.png,Sadness,test\n")
    ds = load("csv", f)
    assert ds.class_names == ["happiness", "sadness"]
    assert ds.train.names == ["img/0.png", "img/1.png"] and list(ds.train.labels) == [0, 1]
    assert (ds.test.images[1] == [150, 0, 0]).all()
    f.write_text("path,label,split\nimg/0.png,4,train\nimg/1.png,5,train\nimg/2.png,4,test\nimg/3.png,5,test\n")
    with pytest.raises(DataError, match=r"list.csv:2: unknown class '4' \(taxonomy=expressions\) \(integer labels need"):
        load("csv", f, taxonomy="expressions")
    ints = load("csv", f)  # integers without label_order are their own classes
    assert ints.class_names == ["4", "5"] and list(ints.train.labels) == [0, 1]
    ds = load("csv", f, label_order="raf")  # RAF 4 = happiness, 5 = sadness
    assert [ds.class_names[y] for y in ds.train.labels] == ["happiness", "sadness"]
    f.write_text("path,label,split\nimg/0.png,happy,train\nimg/1.png,bored,train\nimg/2.png,happy,test\n")
    with pytest.raises(DataError, match=r"list.csv:3: unknown class 'bored'"):
        load("csv", f, taxonomy="expressions")
    mixed = load("csv", f)  # one non-expression label: every label is kept as written
    assert mixed.class_names == ["bored", "happy"] and list(mixed.train.labels) == [1, 0]
    f.write_text("path,label,split\nimg/0.png,happy,train\nimg/0.png,sad,train\nimg/2.png,sad,test\n")
    with pytest.raises(DataError, match=r"duplicate sample name.*list.csv:2 and .*list.csv:3"):
        load("csv", f)
    f.write_text("path,label,x,y,w,h\n" + "".join(f"img/{i}.png,{'happy' if i % 2 else 'sad'},0,0,6,6\n" for i in range(4)))
    ds = load("csv", f, test_ratio="0.5")
    assert len(ds.train) == 2 and len(ds.test) == 2


# --- class remapping / index views --------------------------------------------------------------


def tiny_dataset(class_names: list[str]) -> FERDataset:
    k = len(class_names)
    labels = np.arange(2 * k) % k
    soft = np.full((2 * k, k), 1.0 / k, np.float32)
    imgs = np.arange(2 * k, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    sp = Split(images=imgs, labels=labels, names=[f"n{i}" for i in range(2 * k)], soft_labels=soft)
    return FERDataset(class_names, sp, sp.subset(np.arange(2 * k)), meta={})


def test_remap_classes_drops_and_merges_by_name() -> None:
    ds = tiny_dataset(list(CANONICAL_CLASSES))
    dropped = remap_classes(ds, list(BASIC7), {c: c for c in BASIC7})  # drop contempt
    assert len(dropped.train) == 14 and dropped.num_classes == 7
    assert "n7" not in dropped.train.names
    assert np.allclose(dropped.train.soft_labels.sum(1), 1.0)
    merged = remap_classes(ds, ["neutral", "happiness"], {"neutral": "neutral", "contempt": "neutral", "happy": "happiness"})
    assert merged.train.names == ["n3", "n6", "n7", "n11", "n14", "n15"]
    assert [merged.class_names[y] for y in merged.train.labels] == ["happiness", "neutral", "neutral"] * 2
    # soft: neutral + contempt columns summed (2/8) vs happiness (1/8), renormalised
    assert np.allclose(merged.train.soft_labels[1], [2 / 3, 1 / 3])
    assert merged.meta["class_names"] == ["neutral", "happiness"]
    with pytest.raises(ConfigError, match="not in this dataset"):
        remap_classes(tiny_dataset(list(BASIC7)), ["neutral"], {"contempt": "neutral"})


def test_subset_of_a_non_ndarray_store_is_a_lazy_view() -> None:
    base = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    view = IndexedImages(base, np.arange(10))
    sp = Split(images=view, labels=np.zeros(10), names=[str(i) for i in range(10)])
    sub = sp.subset(np.array([7, 2, 5])).subset(np.array([2, 0]))
    assert isinstance(sub.images, IndexedImages) and sub.images.store is base
    assert sub.images[np.array([0, 1])][:, 0, 0, 0].tolist() == [5, 7]
    assert sub.images.shape == (2, 2, 2, 3)
