"""The prepared cache: round trip equal to direct decoding, sharded gathers, invalidation, refusal."""

from __future__ import annotations

import argparse
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dnfer.data.folder  # noqa: F401 - registers the adapters
import dnfer.data.rafdb  # noqa: F401
from dnfer.data.base import IndexedImages
from dnfer.data.cache import (
    MANIFEST,
    CacheWriter,
    ShardedImages,
    build_cache,
    cache_status,
    load_or_build_cache,
    open_cache,
)
from dnfer.data.spec import DataSpec, load_data_spec
from dnfer.errors import ConfigError, DataError

S = 8


def save(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_folder(root: Path) -> Path:
    """Split layout with awkward (but decodable) image modes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        for cls in ("happy", "sad", "surprise"):
            for i in range(n):
                a = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                img = Image.fromarray(a)
                img = {0: img, 1: img.convert("L"), 2: img.convert("RGBA"), 3: img.convert("CMYK")}[i % 4]
                save(root / split / cls / f"{i}.{'jpg' if img.mode == 'CMYK' else 'png'}", img)
    return root


def spec_of(root: Path, name: str = "folder", **options: str) -> DataSpec:
    return DataSpec(name, root, dict(options))


def quiet(msg: str) -> None:
    pass


def test_round_trip_equals_direct_decoding_across_shards(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "faces")
    spec = spec_of(root)
    out = build_cache(spec, image_size=S, out=tmp_path / "cache", seed=1, skip_bad=False, shard_size=4)
    cached = open_cache(out)
    direct = load_data_spec(spec, image_size=S, seed=1)
    assert cached.class_names == direct.class_names
    for name, sp in direct.splits().items():
        csp = cached.splits()[name]
        assert isinstance(csp.images, ShardedImages)
        assert csp.names == sp.names and np.array_equal(csp.labels, sp.labels)
        assert np.array_equal(csp.images[np.arange(len(csp))], sp.images)
    # random, unsorted, repeated indices gather across shard boundaries
    idx = np.array([14, 0, 3, 4, 3, 11, 7, -1])
    assert np.array_equal(cached.train.images[idx], direct.train.images[idx])
    assert np.array_equal(cached.train.images[5], direct.train.images[5])
    assert len(list((out).glob("shard_*.u8"))) == 8  # 30 images / 4 per shard
    assert cached.meta["counts"]["train"]["total"] == 15
    # subset (the trainer carving validation) stays a lazy view of the cache
    sub = cached.train.subset(np.array([9, 2]))
    assert isinstance(sub.images, IndexedImages)
    assert np.array_equal(sub.images[np.array([1, 0])], direct.train.images[[2, 9]])
    # picklable for DataLoader workers
    again = pickle.loads(pickle.dumps(cached.train.images))
    assert np.array_equal(again[np.array([1])], direct.train.images[[1]])


def test_shards_are_plain_memmappable_arrays(tmp_path: Path) -> None:
    w = CacheWriter(tmp_path, 4, shard_size=3)
    data = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    w.append(data[:2])
    w.append(data[2:])
    w.close()
    assert [s["rows"] for s in w.shards] == [3, 2]
    mm = np.memmap(tmp_path / "shard_00001.u8", np.uint8, "r", shape=(2, 4, 4, 3))
    assert np.array_equal(mm, data[3:])
    reader = ShardedImages([tmp_path / s["file"] for s in w.shards], [3, 2], 4)
    assert np.array_equal(reader[np.array([4, 0, 2, 3])], data[[4, 0, 2, 3]])
    assert np.array_equal(reader.view(1, 4)[np.array([2])], data[[3]])
    with pytest.raises(IndexError):
        reader[np.array([5])]


def _random_shards(root: Path, rows: list[int], size: int, seed: int = 0) -> tuple[ShardedImages, np.ndarray]:
    w = CacheWriter(root, size, shard_size=max(rows))
    data = np.random.default_rng(seed).integers(0, 256, (sum(rows), size, size, 3), dtype=np.uint8)
    w.append(data)
    w.close()
    assert [s["rows"] for s in w.shards] == rows
    return ShardedImages([root / s["file"] for s in w.shards], rows, size), data


def test_read_into_scatters_rows_in_index_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reader, data = _random_shards(tmp_path, [7, 7, 3], 5)
    rng = np.random.default_rng(1)
    # random orders across shard boundaries, runs of consecutive rows, repeats (DDP padding)
    cases = [rng.permutation(17), np.array([3, 4, 5, 6, 7, 8]), np.array([16, 0, 0, 16, 8]), np.array([], np.int64),
             rng.integers(0, 17, 40)]
    for idx in cases:
        out = np.full((len(idx), 5, 5, 3), 7, np.uint8)
        assert reader.read_into(idx, out) is out
        assert np.array_equal(out, data[idx]), idx
    view = reader.view(4, 12)
    assert np.array_equal(view.read_into(np.array([7, 0, 3]), np.empty((3, 5, 5, 3), np.uint8)), data[[11, 4, 7]])
    # one preadv takes at most IOV_MAX buffers, and may return fewer bytes than asked: the
    # reader goes on where it stopped, mid-row included
    real = os.preadv
    calls: list[int] = []

    def short_preadv(fd: int, buffers: list, offset: int) -> int:
        calls.append(len(buffers))
        budget = max(1, sum(len(b) for b in buffers) // 3 + 1)  # about a third of the request
        got = 0
        for b in buffers:
            if got >= budget:
                break
            n = real(fd, [b[: budget - got]], offset + got)
            got += n
        return got

    monkeypatch.setattr("dnfer.data.cache._IOV_MAX", 2)
    monkeypatch.setattr(os, "preadv", short_preadv)
    idx = np.array([2, 3, 4, 5, 6, 0, 13, 14, 15, 16])
    assert np.array_equal(reader.read_into(idx, np.empty((10, 5, 5, 3), np.uint8)), data[idx])
    assert max(calls) <= 2 and len(calls) > 10


def test_read_into_refuses_a_wrong_buffer(tmp_path: Path) -> None:
    reader, _ = _random_shards(tmp_path, [4], 5)
    for bad in (np.empty((2, 5, 5, 3), np.uint8), np.empty((3, 5, 5, 3), np.float32),
                np.empty((3, 5, 5, 6), np.uint8)[..., :3]):
        with pytest.raises(ValueError, match="read_into needs a C-contiguous uint8"):
            reader.read_into(np.array([0, 1, 2]), bad)


def test_gather_uint8_is_the_batch_in_index_order_for_any_store(tmp_path: Path) -> None:
    from dnfer.engine.batches import gather_uint8

    reader, data = _random_shards(tmp_path, [6, 6], 4)
    idx = np.array([11, 0, 5, 6, 5])
    for store in (reader, data, np.memmap(tmp_path / "shard_00000.u8", np.uint8, "r", shape=(6, 4, 4, 3))):
        sel = idx % len(store)
        x = gather_uint8(store, sel)
        assert x.shape == (5, 3, 4, 4) and x.dtype.is_floating_point is False
        assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), data[sel])
    # a split carved out of the cache (IndexedImages) reads through the cache's read_into too
    rows = np.array([10, 3, 7, 0])
    for store in (IndexedImages(reader, rows), IndexedImages(data, rows)):
        sel = np.array([2, 2, 0, 3, 1])
        assert np.array_equal(gather_uint8(store, sel).permute(0, 2, 3, 1).numpy(), data[rows[sel]])
        assert np.array_equal(store.read_into(sel, np.empty((5, 4, 4, 3), np.uint8)), data[rows[sel]])


def touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_cache_reuse_and_invalidation(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "faces")
    cache = tmp_path / "cache"
    spec = spec_of(root)
    ds = load_or_build_cache(spec, image_size=S, cache_dir=cache, seed=1, skip_bad=False, log=quiet)
    assert ds.meta["cache"]["status"].startswith("built")
    built = (cache / MANIFEST).stat().st_mtime_ns
    ds = load_or_build_cache(spec, image_size=S, cache_dir=cache, seed=5, skip_bad=False, log=quiet)
    assert ds.meta["cache"]["status"] == "reused"  # split folders: the seed does not matter
    assert (cache / MANIFEST).stat().st_mtime_ns == built
    assert "image_size" in cache_status(spec, image_size=S * 2, cache_dir=cache, seed=1)
    with pytest.raises(ConfigError, match="'bogus' is not an option of dataset 'folder'"):
        cache_status(spec_of(root, bogus="x"), image_size=S, cache_dir=cache, seed=1)
    assert cache_status(spec_of(root, workers="2"), image_size=S, cache_dir=cache, seed=1) == "valid"
    # a modified image
    img = root / "train" / "happy" / "0.png"
    save(img, Image.new("RGB", (12, 10), (1, 2, 3)))
    touch_later(img)
    assert "source files changed" in cache_status(spec, image_size=S, cache_dir=cache, seed=1)
    ds = load_or_build_cache(spec, image_size=S, cache_dir=cache, seed=1, skip_bad=False, log=quiet)
    assert ds.meta["cache"]["status"].startswith("built (the source files changed")
    assert (ds.train.images[np.array([0])] == [1, 2, 3]).all()
    # an added image (its folder's mtime changes)
    save(root / "train" / "sad" / "new.png", Image.new("RGB", (5, 5)))
    touch_later(root / "train" / "sad")
    assert cache_status(spec, image_size=S, cache_dir=cache, seed=1) != "valid"
    ds = load_or_build_cache(spec, image_size=S, cache_dir=cache, seed=1, skip_bad=False, log=quiet)
    assert len(ds.train) == 16 and "sad/new.png" in ds.train.names
    assert not list(tmp_path.glob(".cache.*"))  # no temp/old folders left behind


def test_seeded_split_caches_depend_on_the_seed(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for cls in ("happy", "sad"):
        for i in range(5):
            save(root / cls / f"{i}.png", Image.new("RGB", (6, 6), (i * 40, 0, 0)))
    spec = spec_of(root)
    load_or_build_cache(spec, image_size=S, cache_dir=tmp_path / "c", seed=1, skip_bad=False, log=quiet)
    assert "seed" in cache_status(spec, image_size=S, cache_dir=tmp_path / "c", seed=2)
    assert "parameter options changed" in cache_status(spec_of(root, test_ratio="0.4"), image_size=S,
                                                       cache_dir=tmp_path / "c", seed=1)
    assert cache_status(spec_of(root, workers="2", max_ram_gb="1"), image_size=S, cache_dir=tmp_path / "c",
                        seed=1) == "valid"  # options that do not change the content
    # list-file splits (RAF-DB) ignore the seed
    raf = tmp_path / "RAF"
    (raf / "EmoLabel").mkdir(parents=True)
    (raf / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 1\ntest_0001.jpg 2\n")
    for n in ("train_00001", "test_0001"):
        save(raf / "Image" / "aligned" / f"{n}_aligned.jpg", Image.new("RGB", (6, 6)))
    rspec = spec_of(raf, "rafdb")
    load_or_build_cache(rspec, image_size=S, cache_dir=tmp_path / "r", seed=1, skip_bad=False, log=quiet)
    assert cache_status(rspec, image_size=S, cache_dir=tmp_path / "r", seed=2) == "valid"
    lf = raf / "EmoLabel" / "list_patition_label.txt"
    lf.write_text("train_00001.jpg 3\ntest_0001.jpg 2\n")
    touch_later(lf)
    assert "source files changed" in cache_status(rspec, image_size=S, cache_dir=tmp_path / "r", seed=1)


def test_refuses_a_folder_that_is_not_a_cache(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "faces")
    target = tmp_path / "important"
    target.mkdir()
    (target / "thesis.tex").write_text("do not delete")
    with pytest.raises(DataError, match=r"important exists, is not empty and is not a dnfer cache"):
        load_or_build_cache(spec_of(root), image_size=S, cache_dir=target, seed=1, skip_bad=False, log=quiet)
    assert (target / "thesis.tex").read_text() == "do not delete"


def test_bad_images_fail_atomically_or_are_recorded(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "faces")
    cache = tmp_path / "cache"
    build_cache(spec_of(root), image_size=S, out=cache, seed=1, skip_bad=False)
    before = open_cache(cache).train.names
    (root / "train" / "happy" / "1.png").write_bytes(b"")
    (root / "test" / "sad" / "2.png").write_text("not a png")
    with pytest.raises(DataError, match=r"2 of 30 images cannot be read: .*happy/1.png \(zero-byte file\).*--skip-bad"):
        build_cache(spec_of(root), image_size=S, out=cache, seed=1, skip_bad=False)
    assert open_cache(cache).train.names == before  # the old cache is intact
    assert not list(tmp_path.glob(".cache.*"))
    ds = load_or_build_cache(spec_of(root), image_size=S, cache_dir=cache, seed=1, skip_bad=True, log=quiet)
    assert ds.meta["num_skipped"] == 2 and len(ds.train) == 14 and len(ds.test) == 8
    assert sorted(Path(s["file"]).name for s in ds.meta["skipped"]) == ["1.png", "2.png"]
    with pytest.raises(DataError, match="2 of 30 images cannot be read"):  # reused without --skip-bad
        load_or_build_cache(spec_of(root), image_size=S, cache_dir=cache, seed=1, skip_bad=False, log=quiet)


def test_prepare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dnfer.commands import prepare

    root = make_folder(tmp_path / "faces")
    parser = argparse.ArgumentParser()
    prepare.add_parser(parser.add_subparsers())
    out = tmp_path / "c"
    argv = ["prepare", "--data", f"folder:{root}", "--image-size", str(S), "--out", str(out), "--shard-size", "7"]
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    text = capsys.readouterr().out
    assert "building (no cache yet)" in text and "train 15, val 6, test 9; skipped 0" in text
    t0 = (out / MANIFEST).stat().st_mtime_ns
    time.sleep(0.01)
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    assert "up to date" in capsys.readouterr().out and (out / MANIFEST).stat().st_mtime_ns == t0


def test_manifest_holds_each_shards_sha256(tmp_path: Path) -> None:
    import hashlib
    import json

    out = build_cache(spec_of(make_folder(tmp_path / "faces")), image_size=S, out=tmp_path / "cache", seed=1,
                      skip_bad=False, shard_size=4)
    shards = json.loads((out / MANIFEST).read_text())["shards"]
    assert len(shards) == 8  # 30 rows / 4
    for s in shards:  # what was hashed while writing is what is on disk
        assert s["sha256"] == hashlib.sha256((out / s["file"]).read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_shard_is_reported_with_one_line_naming_it(tmp_path: Path, damage: str, capsys) -> None:
    from dnfer.cli import main

    root = make_folder(tmp_path / "faces")
    out = build_cache(spec_of(root), image_size=S, out=tmp_path / "cache", seed=1, skip_bad=False, shard_size=4)
    shard = out / "shard_00002.u8"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit: same size, only the checksum can tell
    else:
        data = data[:-5]
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        open_cache(out)
    msg = str(err.value)
    assert str(shard) in msg and "\n" not in msg and ("checksum" in msg if damage == "flip" else "bytes" in msg)
    # through the CLI (training reads the cache the same way): one line, exit 2
    code = main(["train", "--data", f"folder:{root}", "--cache", str(out), "--image-size", str(S), "--model",
                 "tiny_cnn", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4", "--out", str(tmp_path / "run"), "--no-progress"])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err_lines) == 1 and str(shard) in err_lines[0]
