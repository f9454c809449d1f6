"""Synthetic FER generator: determinism, class frequencies, AU geometry, loader cache, writers, CLI."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import pytest

from dnfer.data.classes import BASIC7, CANONICAL_CLASSES
from dnfer.data.noise import read_label_file
from dnfer.data.synth_render import AU_INDEX, face_landmarks, render_face, render_faces
from dnfer.data.synthetic import (
    RAF_TEST_COUNTS,
    RAF_TRAIN_COUNTS,
    class_probabilities,
    generate,
    labels_for,
    load_synthetic,
    parse_options,
    sample_expression_params,
    write_folder,
    write_rafdb,
)
from dnfer.errors import ConfigError
from dnfer.registry import DATASETS


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DNFER_CACHE_DIR", str(tmp_path / "cache"))


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different_images() -> None:
    a, ya, _ = generate(6, seed=3, image_size=24)
    b, yb, _ = generate(6, seed=3, image_size=24)
    assert a.tobytes() == b.tobytes() and np.array_equal(ya, yb)
    c, _, _ = generate(6, seed=4, image_size=24)
    assert all(not np.array_equal(a[i], c[i]) for i in range(6))
    # Different splits of one seed are different images too.
    t, _, _ = generate(6, seed=3, split="test", image_size=24)
    assert all(not np.array_equal(a[i], t[i]) for i in range(6))


def test_image_i_depends_only_on_seed_split_and_i() -> None:
    full, yf, _ = generate(7, seed=11, image_size=20)
    part, yp, _ = generate(3, seed=11, image_size=20, start=4)
    assert np.array_equal(full[4:7], part) and np.array_equal(yf[4:7], yp)


def test_batched_rendering_equals_one_face_at_a_time() -> None:
    """generate() draws chunks of faces with shared numpy calls; each image must still be exactly
    what its parameters alone give, whatever its neighbours (every feature switched on somewhere:
    harsh nuisances bring glasses, occluders, beards, bangs; contempt is one-sided)."""
    _, _, params = generate(120, seed=9, image_size=32, nuisance=2.0, min_intensity=0.0,
                            class_names=CANONICAL_CLASSES)
    assert {p.glasses for p in params} == {0, 1, 2} and {p.occluder for p in params} == {0, 1, 2}
    assert {p.hair_style for p in params} == {0, 1, 2, 3} and {p.facial_hair for p in params} == {0, 1, 2, 3}
    together = render_faces(params, image_size=32)
    alone = np.stack([render_face(p, image_size=32) for p in params])
    reversed_batch = render_faces(params[::-1], image_size=32)[::-1]
    assert together.dtype == np.uint8 and together.shape == (120, 32, 32, 3)
    assert np.array_equal(together, alone) and np.array_equal(together, reversed_batch)


def test_workers_do_not_change_the_data() -> None:
    a, ya, _ = generate(300, seed=2, image_size=12, workers=1)
    b, yb, _ = generate(300, seed=2, image_size=12, workers=2)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)


# --- class frequencies -------------------------------------------------------------------------


def test_class_frequencies_follow_rafdb_train_and_test() -> None:
    for split, counts in (("train", RAF_TRAIN_COUNTS), ("test", RAF_TEST_COUNTS)):
        want = np.array([counts[c] for c in BASIC7], float)
        want /= want.sum()
        y = labels_for(20000, seed=5, split=split)
        got = np.bincount(y, minlength=7) / len(y)
        np.testing.assert_allclose(got, want, atol=0.002)
    # A short prefix is already close (low-discrepancy labels, unlike i.i.d. draws).
    y = labels_for(1000, seed=5)
    assert abs(np.mean(y == BASIC7.index("fear")) - 281 / 12271) < 0.005
    assert np.array_equal(labels_for(1000, seed=5)[:300], labels_for(300, seed=5))


def test_balanced_and_contempt_frequencies() -> None:
    y = labels_for(7000, seed=1, balanced=True)
    assert np.all(np.abs(np.bincount(y, minlength=7) - 1000) <= 3)
    p8 = class_probabilities(CANONICAL_CLASSES)
    assert len(p8) == 8 and abs(p8.sum() - 1) < 1e-12 and abs(p8[7] - 0.02) < 1e-12
    y8 = labels_for(5000, seed=1, class_names=CANONICAL_CLASSES)
    assert y8.max() == 7 and abs(np.mean(y8 == 7) - 0.02) < 0.003


# --- label / geometry consistency ---------------------------------------------------------------


def _params(label: str, seed: int, intensity: float | None = 1.0, nuisance: float = 1.0):
    return sample_expression_params(np.random.default_rng([seed, 7]), label, intensity=intensity, nuisance=nuisance)


def test_mouth_corners_up_for_happiness_down_for_sadness() -> None:
    for seed in range(40):
        happy = face_landmarks(_params("happiness", seed))
        sad = face_landmarks(_params("sadness", seed))
        neutral = face_landmarks(_params("neutral", seed))
        assert happy["corner_lift"] > 0.05, seed
        assert sad["corner_lift"] < -0.03, seed
        assert happy["corner_lift"] > neutral["corner_lift"] > sad["corner_lift"], seed


def test_intensity_scales_the_expression_towards_neutral() -> None:
    lifts = [face_landmarks(_params("happiness", 3, s))["corner_lift"] for s in (0.0, 0.3, 0.6, 1.0)]
    assert lifts == sorted(lifts) and lifts[-1] - lifts[0] > 0.08
    weak = _params("happiness", 3, 0.0)
    neutral = _params("neutral", 3)
    # Intensity 0 leaves only resting activity: the same magnitude as a neutral face.
    assert weak.au.max() < 0.3 and abs(weak.a(12) - neutral.a(12)) < 0.3


def test_brows_and_mouth_follow_the_prototypes() -> None:
    for seed in range(20):
        relaxed = _params("neutral", seed)
        relaxed.au[:] = 0.0  # no idle movement: the identity's resting face
        n = face_landmarks(relaxed)
        sur = face_landmarks(_params("surprise", seed))
        fear = face_landmarks(_params("fear", seed))
        ang = face_landmarks(_params("anger", seed))
        # y points down: raised brows have smaller y.
        assert sur["brow_inner"][:, 1].mean() < n["brow_inner"][:, 1].mean() - 0.05
        assert fear["brow_inner"][:, 1].mean() < n["brow_inner"][:, 1].mean()
        assert ang["brow_inner"][:, 1].mean() > n["brow_inner"][:, 1].mean() + 0.03
        assert sur["mouth_open"] > 0.1 and ang["mouth_open"] < sur["mouth_open"]
        assert sur["eye_aperture"][0] > max(n["eye_aperture"][0], ang["eye_aperture"][0])


def test_contempt_is_one_sided() -> None:
    p = sample_expression_params(np.random.default_rng(0), "contempt", class_names=CANONICAL_CLASSES, intensity=1.0)
    corners = face_landmarks(p)["mouth_corners"]
    assert abs(corners[0, 1] - corners[1, 1]) > 0.05


def test_action_units_change_the_right_part_of_the_image() -> None:
    base = _params("neutral", 1, nuisance=0.0)
    base.au[:] = 0.0
    ref = render_face(base, image_size=64).astype(int)
    half = 32  # the face centre is the image centre at nuisance 0; brows are above it, the mouth below

    def diff_rows(unit: int) -> np.ndarray:
        q = copy.deepcopy(base)
        q.au[AU_INDEX[unit]] = 1.0
        return np.abs(render_face(q, image_size=64).astype(int) - ref).sum(axis=(1, 2))

    brows, smile = diff_rows(2), diff_rows(12)
    assert brows.sum() > 0 and smile.sum() > 0
    assert brows[:half].sum() > 0.9 * brows.sum()
    assert smile[half:].sum() > 0.9 * smile.sum()


# --- values, dtypes, loader ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 33])
def test_value_ranges_and_dtypes(size: int) -> None:
    x, y, params = generate(9, seed=0, image_size=size, class_names=CANONICAL_CLASSES)
    assert x.dtype == np.uint8 and x.shape == (9, size, size, 3)
    assert y.dtype == np.int64 and y.shape == (9,) and y.min() >= 0 and y.max() < 8
    assert [p.label for p in params] == y.tolist()
    assert all(0.0 <= p.au.min() and p.au.max() <= 1.0 for p in params)
    assert x.std() > 5  # not blank


def test_loader_splits_meta_and_cache(tmp_path: Path) -> None:
    import dnfer.data.registry_builtins  # noqa: F401  (registers the loaders without importing torch)
    assert DATASETS.get("synthetic") is load_synthetic
    opts = {"n_train": "30", "n_test": "12", "contempt": "true"}
    ds = load_synthetic(None, image_size=16, options=opts, seed=4, skip_bad=False)
    assert ds.val is None and ds.class_names == list(CANONICAL_CLASSES)
    assert len(ds.train) == 30 and len(ds.test) == 12 and ds.train.images.shape == (30, 16, 16, 3)
    assert ds.meta["generator_version"] and ds.meta["generator_params"]["seed"] == 4
    assert ds.meta["cache_hit"] is False and Path(ds.meta["cache_file"]).is_file()
    again = load_synthetic(None, image_size=16, options=opts, seed=4, skip_bad=False)
    assert again.meta["cache_hit"] is True
    assert np.array_equal(again.train.images, ds.train.images) and np.array_equal(again.test.labels, ds.test.labels)
    other = load_synthetic(None, image_size=16, options={**opts, "nuisance": "0.5"}, seed=4, skip_bad=False)
    assert other.meta["cache_hit"] is False and other.meta["cache_file"] != ds.meta["cache_file"]
    # A corrupt cache file is regenerated, not trusted.
    Path(ds.meta["cache_file"]).write_bytes(b"garbage")
    fixed = load_synthetic(None, image_size=16, options=opts, seed=4, skip_bad=False)
    assert fixed.meta["cache_hit"] is False and np.array_equal(fixed.train.images, ds.train.images)
    assert load_synthetic(None, image_size=16, options={"n_train": "5", "n_test": "3"}, seed=0,
                          skip_bad=False).class_names == list(BASIC7)


def test_bad_options_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="valid keys: .*n_test.*n_train"):
        parse_options({"n_trian": "5"})
    with pytest.raises(ConfigError, match="balanced"):
        parse_options({"balanced": "maybe"})
    with pytest.raises(ConfigError, match="n_train"):
        parse_options({"n_train": "0"})
    with pytest.raises(ConfigError, match="nuisance"):
        parse_options({"nuisance": "lots"})


# --- writers and CLI ----------------------------------------------------------------------------


def _splits(n_train: int = 14, n_test: int = 7, size: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    tr = generate(n_train, seed=1, image_size=size, balanced=True)
    te = generate(n_test, seed=1, split="test", image_size=size, balanced=True)
    return {"train": tr[:2], "test": te[:2]}


def test_rafdb_layout_reads_back(tmp_path: Path) -> None:
    splits = _splits()
    label_file = write_rafdb(tmp_path / "raf", splits, class_names=BASIC7)
    table = read_label_file(label_file)
    assert table["train_00001.jpg"] == BASIC7[int(splits["train"][1][0])]
    assert "test_0001.jpg" in table and len(table) == 21
    first = label_file.read_text().splitlines()[0].split()
    assert first[0] == "train_00001.jpg" and int(first[1]) == int(splits["train"][1][0]) + 1  # 1-based RAF order
    assert (tmp_path / "raf" / "Image" / "aligned" / "test_0007_aligned.jpg").is_file()
    import dnfer.data.registry_builtins  # noqa: F401  (registers the loaders without importing torch)
    ds = DATASETS.get("rafdb")(tmp_path / "raf", image_size=16, options={}, seed=0, skip_bad=False)
    assert len(ds.train) == 14 and len(ds.test) == 7
    got = sorted(ds.class_names[int(y)] for y in ds.train.labels)
    assert got == sorted(BASIC7[int(y)] for y in splits["train"][1])


def test_folder_layout_reads_back(tmp_path: Path) -> None:
    splits = _splits()
    write_folder(tmp_path / "fold", splits, class_names=BASIC7, ext="png")
    files = sorted((tmp_path / "fold" / "train").rglob("*.png"))
    assert len(files) == 14
    import dnfer.data.registry_builtins  # noqa: F401  (registers the loaders without importing torch)
    ds = DATASETS.get("folder")(tmp_path / "fold", image_size=16, options={}, seed=0, skip_bad=False)
    assert len(ds.train) == 14 and len(ds.test) == 7
    got = sorted(ds.class_names[int(y)] for y in ds.test.labels)
    assert got == sorted(BASIC7[int(y)] for y in splits["test"][1])
    # PNG is lossless: a written image reads back exactly.
    import cv2

    img = cv2.imread(str(tmp_path / "fold" / "train" / BASIC7[int(splits["train"][1][0])] / "train_00001.png"))
    assert np.array_equal(img[:, :, ::-1], splits["train"][0][0])


def _cli(argv: list[str]) -> argparse.Namespace:
    from dnfer.commands import synth

    parser = argparse.ArgumentParser()
    synth.add_parser(parser.add_subparsers())
    return parser.parse_args(["synth", *argv])


def test_cli_writes_layout_and_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dnfer.commands import synth

    out = tmp_path / "s"
    args = _cli(["--out", str(out), "--layout", "rafdb", "--n", "20", "--image-size", "16", "--preview", "--contempt"])
    assert synth.run(args) == 0
    lines = (out / "EmoLabel" / "list_patition_label.txt").read_text().splitlines()
    assert len(lines) == 20 and sum(ln.startswith("test_") for ln in lines) == 4
    assert len(list((out / "Image" / "aligned").glob("*_aligned.jpg"))) == 20
    import cv2

    sheet = cv2.imread(str(out / "preview.png"))
    assert sheet is not None and sheet.shape[0] > 8 * 60  # 8 class rows
    assert "16 train + 4 test" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="test-fraction"):
        synth.run(_cli(["--out", str(out), "--test-fraction", "1.5"]))
    with pytest.raises(ConfigError, match="png"):
        synth.run(_cli(["--out", str(out), "--format", "png"]))


def test_counter_draws_are_uniform_normal_and_keyed() -> None:
    from dnfer.data.synthetic import counter_draws

    u, n, c = counter_draws(3, 0, np.arange(4000))
    assert u.shape == (4000, 96) and n.shape == (4000, 48) and c.shape == (4000, 54)
    assert 0.0 <= u.min() and u.max() < 1.0 and 0.0 <= c.min() and c.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert abs(n.mean()) < 0.01 and abs(n.std() - 1.0) < 0.01
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.05
    # Keyed by (seed, split, index): another seed or split changes every row; a row is its own.
    assert np.all(np.any(counter_draws(4, 0, np.arange(50))[0] != u[:50], axis=1))
    assert np.all(np.any(counter_draws(3, 2, np.arange(50))[0] != u[:50], axis=1))
    assert np.array_equal(counter_draws(3, 0, np.array([7, 2]))[0], u[[7, 2]])
