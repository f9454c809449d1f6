"""``dnfer pretrain``: the synthetic identity mode, the objectives' maths, the backbone file that
``train --pretrained`` loads, exact resume, identity folders, CLI errors and DDP (gloo, 2 CPU
processes)."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file
from tests.conftest import tiny_config

from dnfer.cli import main
from dnfer.data.identity import load_identity_set
from dnfer.data.synthetic import (
    IDENTITY_EXPRESSION_NAMESPACE,
    IDENTITY_IMAGE_NAMESPACE,
    IDENTITY_NAMESPACE,
    SPLIT_IDS,
    _splitmix64,
    generate,
    generate_identities,
)
from dnfer.engine.pretrain import (
    BACKBONE_FILE,
    DEFAULT_EPOCHS,
    IdentityHead,
    PretrainSettings,
    fit_linear_probe,
    lr_factor,
    pretrain,
    read_backbone_metadata,
    vicreg_loss,
)
from dnfer.errors import ConfigError, DataError
from dnfer.models.factory import create_model
from dnfer.models.pretrained import load_pretrained

#: FaceParams fields of the identity block (drawn first by the sampler, fixed per person).
IDENTITY_FIELDS = ("face_w", "face_top", "face_bot", "jaw_taper", "skin", "eye_y", "eye_sep", "eye_w", "eye_open",
                   "eye_low", "iris_r", "iris_color", "hair_color", "brow_color", "brow_dist", "brow_thick",
                   "brow_arch", "nose_y", "nose_w", "mouth_y", "mouth_w", "lip_up", "lip_lo", "lip_color",
                   "hair_style", "hairline", "facial_hair", "glasses", "glasses_round", "glasses_color",
                   "rest_curve", "rest_brow", "age")
#: Drawn right after the identity block (clothes, gaze) or later (intensity): vary per image.
PER_IMAGE_FIELDS = ("clothes_color", "gaze", "intensity", "rot", "bg_corners")


def _settings(**kw: object) -> PretrainSettings:
    base = dict(objective="identity", model="tiny_cnn", image_size=16, epochs=2, batch_size=8, identities=4,
                images_per_identity=6, precision="fp32", threads=1, probe_data=None, progress=False, device="cpu")
    base.update(kw)
    return PretrainSettings(**base)  # type: ignore[arg-type]


# --- the synthetic identity mode ---------------------------------------------------------------


def test_identity_mode_shapes_labels_and_prefix_property() -> None:
    images, ids, expr, params = generate_identities(3, 4, seed=5, image_size=16)
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    assert ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert expr.dtype == np.int64 and ((expr >= 0) & (expr < 7)).all() and len(set(expr.tolist())) > 1
    assert [p.label for p in params] == expr.tolist()
    # An identity's images do not depend on how many people or images per person were asked for.
    small, small_ids, small_expr, _ = generate_identities(2, 2, seed=5, image_size=16)
    rows = [0, 1, 4, 5]
    assert np.array_equal(small, images[rows]) and np.array_equal(small_expr, expr[rows])
    assert small_ids.tolist() == [0, 0, 1, 1]
    assert not np.array_equal(generate_identities(2, 2, seed=6, image_size=16)[0], small)


def test_identity_block_is_fixed_per_person_and_the_rest_varies_per_image() -> None:
    _, ids, _, params = generate_identities(4, 5, seed=0, image_size=8, traits="all")
    for k in range(4):
        person = [asdict(p) for p, i in zip(params, ids, strict=True) if i == k]
        for f in IDENTITY_FIELDS:
            assert all(str(q[f]) == str(person[0][f]) for q in person), f
        for f in PER_IMAGE_FIELDS:  # the first draws after the block: an off-by-one would fix them too
            assert len({str(q[f]) for q in person}) > 1, f
    faces = {asdict(p)["face_w"] for p in params}
    assert len(faces) == 4  # different people differ


#: traits="shape": the face's geometry, fixed per person; the colours and accessories drawn per image.
SHAPE_FIELDS = ("face_w", "face_top", "face_bot", "jaw_taper", "eye_y", "eye_sep", "eye_w", "eye_open", "eye_low",
                "iris_r", "brow_dist", "brow_thick", "brow_arch", "nose_y", "nose_w", "mouth_y", "mouth_w", "lip_up",
                "lip_lo", "hairline", "rest_curve", "rest_brow", "age")
COLOUR_FIELDS = ("skin", "iris_color", "hair_color", "brow_color", "lip_color", "hair_style")


def test_shape_traits_the_default_fix_only_the_geometry_per_person() -> None:
    _, ids, _, params = generate_identities(4, 6, seed=0, image_size=8)  # the default
    _, _, _, all_traits = generate_identities(4, 6, seed=0, image_size=8, traits="all")
    for k in range(4):
        person = [asdict(p) for p, i in zip(params, ids, strict=True) if i == k]
        for f in SHAPE_FIELDS:
            assert all(str(q[f]) == str(person[0][f]) for q in person), f
        for f in COLOUR_FIELDS + PER_IMAGE_FIELDS:
            assert len({str(q[f]) for q in person}) > 1, f
    # Same people (same geometry) as traits="all"; only what is fixed changes.
    for p, q in zip(params, all_traits, strict=True):
        assert all(str(asdict(p)[f]) == str(asdict(q)[f]) for f in SHAPE_FIELDS)
    with pytest.raises(ConfigError, match="traits"):
        generate_identities(2, 2, seed=0, image_size=8, traits="colour")
    with pytest.raises(ConfigError, match="traits=colour: valid are all, shape"):
        load_identity_set("synthetic", image_size=8, seed=0, identities=2, images_per_identity=2,
                          options={"traits": "colour"})
    data = load_identity_set("synthetic", image_size=8, seed=0, identities=2, images_per_identity=2)
    assert data.meta["traits"] == "shape" and len(data) == 4
    data = load_identity_set("synthetic", image_size=8, seed=0, identities=2, images_per_identity=2,
                             options={"Traits": "all"})
    assert data.meta["traits"] == "all"


def test_identity_namespaces_never_meet_the_fer_splits() -> None:
    # Keys are splitmix64(splitmix64(seed ^ namespace << 56) ^ index): two (seed, namespace) pairs
    # can share a key only if their inner hashes differ by index_a ^ index_b. Every difference
    # here is >= 2**44, far above any image index (identity k's image j: k * 2**20 + j).
    fer = set(SPLIT_IDS.values())
    ours = (IDENTITY_NAMESPACE, IDENTITY_IMAGE_NAMESPACE, IDENTITY_EXPRESSION_NAMESPACE)
    assert not fer & set(ours)
    with np.errstate(over="ignore"):
        def inner(seed: int, ns: int) -> int:
            return int(_splitmix64(np.uint64(seed) ^ np.uint64(ns) << np.uint64(56)))

        for s1 in range(16):
            for s2 in range(16):
                for a in ours:
                    for b in fer:
                        assert inner(s1, a) ^ inner(s2, b) >= 2**44
    # And the drawn people: no identity of the identity mode is any FER image's identity.
    _, _, _, people = generate_identities(40, 1, seed=0, image_size=8)
    fer_faces = set()
    for split in SPLIT_IDS:
        fer_faces |= {(p.face_w, p.eye_sep, p.nose_y) for p in generate(100, seed=0, split=split, image_size=8)[2]}
    assert not {(p.face_w, p.eye_sep, p.nose_y) for p in people} & fer_faces


# --- the objectives' maths ---------------------------------------------------------------------


def test_cosface_and_softmax_heads_on_hand_values() -> None:
    head = IdentityHead(2, 3, margin=0.35, scale=30.0)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.6, 0.8]]))  # norms 2, 3, 1
    f = torch.tensor([[5.0, 0.0]])  # cosines 1, 0, 0.6
    assert torch.allclose(head(f), torch.tensor([[30.0, 0.0, 18.0]]), atol=1e-5)
    assert torch.allclose(head(f, torch.tensor([0])), torch.tensor([[30 * 0.65, 0.0, 18.0]]), atol=1e-5)
    assert torch.allclose(head(f, torch.tensor([2])), torch.tensor([[30.0, 0.0, 30 * 0.25]]), atol=1e-5)
    softmax = IdentityHead(2, 3, margin=0.0)
    assert softmax.linear.bias is not None
    assert torch.allclose(softmax(f, torch.tensor([1])), softmax.linear(f))


def test_vicreg_terms_on_hand_values() -> None:
    # Perfectly correlated dimensions, std sqrt(2) > 1: invariance 1 (z2 = z1 + 1), variance 0,
    # covariance matrix [[2, 2], [2, 2]]: off-diagonal squares 8, / 2 dims = 4 per branch.
    z1 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    loss, terms = vicreg_loss(z1, z1 + 1)
    assert terms["invariance"] == pytest.approx(1.0)
    assert terms["variance"] == pytest.approx(0.0)
    assert terms["covariance"] == pytest.approx(8.0)
    assert float(loss) == pytest.approx(25 * 1.0 + 8.0)
    # A collapsed dimension (std 0 -> sqrt(eps) = 0.01) costs relu(1 - 0.01) averaged over 2 dims.
    z = torch.tensor([[1.0, 3.0], [-1.0, 3.0]])
    loss, terms = vicreg_loss(z, z)
    assert terms["invariance"] == 0.0 and terms["covariance"] == pytest.approx(0.0)
    assert terms["variance"] == pytest.approx(0.99 / 2, rel=1e-4)
    assert float(loss) == pytest.approx(25 * 0.99 / 2, rel=1e-4)


def test_lr_schedule_and_linear_probe() -> None:
    assert lr_factor(0, total_steps=10, warmup_steps=2) == pytest.approx(0.5)
    assert lr_factor(2, total_steps=10, warmup_steps=2) == pytest.approx(1.0)
    assert lr_factor(6, total_steps=10, warmup_steps=2) == pytest.approx(0.5)
    assert lr_factor(10, total_steps=10, warmup_steps=2) == pytest.approx(0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 3] > 0).long()  # linearly separable
    mean, std, w, b = fit_linear_probe(x, y, 2)
    assert ((((x - mean) / std) @ w.T + b).argmax(1) == y).all()


# --- runs: the backbone file, resume, DDP --------------------------------------------------------


def test_identity_pretrain_writes_a_backbone_that_train_loads_cleanly(tmp_path: Path) -> None:
    s = _settings(model="resnet10_slim", image_size=32, epochs=1, probe_data="synthetic",
                  probe_options={"n_train": "48", "n_test": "24"})
    summary = pretrain(s, tmp_path / "pt", log=lambda _m: None)
    path = tmp_path / "pt" / BACKBONE_FILE
    meta = read_backbone_metadata(path)
    assert (meta["format"], meta["model"], meta["image_size"], meta["objective"]) == (
        "dnfer-backbone", "resnet10_slim", "32", "identity")
    assert meta["settings"]["identities"] == 4 and meta["data"]["source"] == "synthetic-identities"
    probe = summary["probe"]
    assert probe["test_images"] == 24 and 0.0 <= probe["test_accuracy"] <= 1.0 and 0.0 <= probe["train_accuracy"] <= 1
    model = create_model("resnet10_slim", 7, image_size=32)
    report = load_pretrained(model, path, model_name="resnet10_slim")
    assert report.ok and report.loaded == len(model.backbone.state_dict()) and not report.skipped_classifier
    saved = load_file(str(path))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, saved[f"backbone.{k}"])


def test_epochs_default_per_objective(tmp_path: Path) -> None:
    assert DEFAULT_EPOCHS == {"identity": 15, "ssl": 10}
    assert PretrainSettings(objective="ssl").resolved_epochs() == 10
    assert PretrainSettings(objective="ssl", epochs=3).resolved_epochs() == 3
    summary = pretrain(_settings(epochs=None, identities=2, images_per_identity=4), tmp_path / "pt", log=lambda _m: None)
    meta = read_backbone_metadata(tmp_path / "pt" / BACKBONE_FILE)
    # The resolved number is what ran and what the file records (so --resume compares numbers).
    assert summary["epochs_done"] == meta["settings"]["epochs"] == 15


def test_ssl_pretrain_then_fit_reports_a_clean_load(tmp_path: Path) -> None:
    s = _settings(objective="ssl", data_options={"n_train": "32", "n_test": "8"}, epochs=1, expander_dim=16)
    summary = pretrain(s, tmp_path / "pt", log=lambda _m: None)
    assert summary["last_epoch"]["variance"] >= 0 and summary["images"] == 32
    from dnfer.engine.trainer import fit

    cfg = tiny_config(str(tmp_path / "ft"), epochs=1)
    cfg.model.pretrained = str(tmp_path / "pt" / BACKBONE_FILE)
    lines: list[str] = []
    fit(cfg, log=lines.append)
    load = [m for m in lines if m.startswith("pretrained ")]
    assert load and "missing 0, unexpected 0, shape-mismatched 0" in load[0]


def test_resume_is_exact_and_checkpoints_are_plain_data(tmp_path: Path) -> None:
    whole = pretrain(_settings(), tmp_path / "whole", log=lambda _m: None)
    part = pretrain(_settings(), tmp_path / "part", log=lambda _m: None, stop_after_epochs=1)
    assert part["epochs_done"] == 1 and not (tmp_path / "part" / BACKBONE_FILE).exists()
    ckpt = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 1
    with pytest.raises(ConfigError, match="already holds"):
        pretrain(_settings(), tmp_path / "part", log=lambda _m: None)
    with pytest.raises(ConfigError, match="lr differ"):
        pretrain(_settings(lr=0.5), tmp_path / "part", resume=True, log=lambda _m: None)
    resumed = pretrain(_settings(), tmp_path / "part", resume=True, log=lambda _m: None)
    assert resumed["epochs_done"] == whole["epochs_done"] == 2
    a, b = load_file(str(tmp_path / "whole" / BACKBONE_FILE)), load_file(str(tmp_path / "part" / BACKBONE_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DNFER_CACHE_DIR=os.path.join(tmp, "cache"))
    from dnfer.engine import pretrain as pretrain_mod

    models = []
    train_epoch = pretrain_mod._train_epoch

    def keep_model(model: torch.nn.Module, *args: object) -> dict[str, float]:
        models.append(model)
        return train_epoch(model, *args)  # type: ignore[arg-type]

    pretrain_mod._train_epoch = keep_model  # type: ignore[assignment]
    s = _settings(objective="ssl", data_options={"n_train": "32", "n_test": "8"}, epochs=1, expander_dim=16)
    summary = pretrain_mod.pretrain(s, Path(tmp) / "ddp", log=lambda _m: None)
    params = {k: v.detach().clone() for k, v in models[-1].module.net.backbone.named_parameters()}
    torch.save({"world_size": summary["world_size"], "params": params}, Path(tmp) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["params"].keys() == r1["params"].keys()
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])  # DDP kept them in step
    saved = load_file(str(tmp_path / "ddp" / BACKBONE_FILE))
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in r0["params"].items())
    with pytest.raises(ConfigError, match="process"):  # resuming with another world size is refused
        pretrain(_settings(objective="ssl", data_options={"n_train": "32", "n_test": "8"}, epochs=1,
                           expander_dim=16), tmp_path / "ddp", resume=True, log=lambda _m: None)


# --- identity folders and CLI errors -----------------------------------------------------------


def _identity_tree(root: Path, people: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, n in people.items():
        (root / name).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / name / f"{j}.png")
    (root / "README.txt").write_text("not an identity")


def test_identity_folders_sorted_names_and_errors(tmp_path: Path) -> None:
    _identity_tree(tmp_path / "ids", {"zoe": 2, "Adam": 3, "m_01": 1})
    (tmp_path / "ids" / "zoe" / "notes.txt").write_text("ignored")
    data = load_identity_set(f"folder:{tmp_path / 'ids'}", image_size=16, seed=0, identities=0, images_per_identity=0)
    assert data.class_names == ["Adam", "m_01", "zoe"]
    assert data.labels.tolist() == [0, 0, 0, 1, 2, 2] and data.images.shape == (6, 16, 16, 3)
    _identity_tree(tmp_path / "one", {"solo": 2})
    with pytest.raises(DataError, match="at least 2"):
        load_identity_set(f"folder:{tmp_path / 'one'}", image_size=16, seed=0, identities=0, images_per_identity=0)
    (tmp_path / "ids" / "empty").mkdir()
    with pytest.raises(DataError, match="'empty' holds no images"):
        load_identity_set(f"folder:{tmp_path / 'ids'}", image_size=16, seed=0, identities=0, images_per_identity=0)
    with pytest.raises(ConfigError, match="identity pretraining reads"):
        load_identity_set(f"rafdb:{tmp_path}", image_size=16, seed=0, identities=0, images_per_identity=0)


@pytest.mark.parametrize(("argv", "message"), [
    (["--objective", "identity", "--data", "rafdb:/nope"], "identity pretraining reads"),
    (["--objective", "identity", "--identities", "1"], "--identities 1"),
    (["--objective", "identity", "--data-option", "n_train=9"], "not an option of the synthetic identity mode"),
    (["--objective", "identity", "--data-option", "traits=colour"], "traits=colour: valid are all, shape"),
    (["--objective", "ssl", "--model", "nope"], "nope"),
    (["--objective", "identity", "--margin", "1.5"], "--margin"),
    (["--objective", "ssl", "--probe-data", "none", "--probe-option", "n_train=8"], "--probe-option"),
])
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                 message: str) -> None:
    code = main(["pretrain", *argv, "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and err.startswith("dnfer pretrain: error:")


def test_a_second_pretraining_into_a_locked_folder_names_the_holder(tmp_path: Path) -> None:
    from dnfer.io_safety import RunLock

    out = tmp_path / "pt"
    out.mkdir()
    (out / ".last.pt.tmp-999999999").write_bytes(b"partial")  # a killed writer's temporary
    with RunLock(out), pytest.raises(ConfigError, match=r"in use by another dnfer run \(pid \d+"):
        pretrain(_settings(epochs=1), out, log=lambda _m: None)
    assert not (out / BACKBONE_FILE).exists()
    pretrain(_settings(epochs=1), out, log=lambda _m: None)  # released: runs, and sweeps the temporary
    assert (out / BACKBONE_FILE).exists() and not (out / ".last.pt.tmp-999999999").exists()
