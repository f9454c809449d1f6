"""Named weights download on first use into the standard caches, exactly once, checked against the
hash in their file name; ``--offline`` / ``DNFER_OFFLINE`` / ``HF_HUB_OFFLINE`` turn that off.

The torchvision downloads come from an HTTP server on 127.0.0.1 started by the test (the weights
enum's URL is pointed at it); nothing here contacts any other address.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision

from dnfer.cli import main
from dnfer.errors import ConfigError
from dnfer.models.factory import create_model
from dnfer.models.pretrained import load_pretrained

WEIGHTS = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
TINY_TRAIN = ["--image-size", "16", "--data-option", "n_train=96", "--data-option", "n_test=32", "--batch-size", "16",
              "--epochs", "2", "--warmup-epochs", "1", "--precision", "fp32", "--threads", "1", "--no-progress"]


@contextlib.contextmanager
def serve(directory: Path, limit_s: float = 60.0) -> Iterator[tuple[str, list[str]]]:
    """Serve ``directory`` on 127.0.0.1 (a free port) until the block ends or ``limit_s`` passes.

    Yields the base URL and the list of request paths served so far.
    """
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    bound = threading.Timer(limit_s, server.shutdown)  # stops by itself if a test hangs
    bound.daemon = True
    bound.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        bound.cancel()
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ResNet-18 state dict (fp16 to halve the bytes) named ``resnet18-<sha256[:8]>.pth``, as torch hub names files."""
    torch.manual_seed(3)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in torchvision.models.resnet18().state_dict().items()}
    d = tmp_path_factory.mktemp("served")
    tmp = d / "w.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = d / f"resnet18-{digest[:8]}.pth"
    tmp.rename(path)
    return path, state


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Downloads allowed, TORCH_HOME in tmp_path (returned), no proxy between us and 127.0.0.1."""
    for name in ("DNFER_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    msd = model.state_dict()
    for key in ("conv1.weight", "layer3.1.bn2.running_var", "layer4.0.downsample.0.weight"):
        assert torch.equal(msd[f"backbone.{key}"], state[key].float()), key


def test_first_use_downloads_into_torch_hub_cache_then_reads_it_offline(
        weights_file, online: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, state = weights_file
    cached = online / path.name
    with serve(path.parent) as (base, requests):
        monkeypatch.setattr(WEIGHTS.value, "url", f"{base}/{path.name}")
        model = create_model("resnet18", 7, image_size=32, weights="IMAGENET1K_V1")  # the API
        assert requests == [f"/{path.name}"]
    assert cached.is_file() and cached.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in online.iterdir()) == [path.name]  # no temporary file left behind
    _assert_loaded(model, state)
    # The server is gone: the CLI's loader reads the same cache file, also with downloads off.
    monkeypatch.setenv("DNFER_OFFLINE", "1")
    again = create_model("resnet18", 7, image_size=32)
    report = load_pretrained(again, "torchvision:IMAGENET1K_V1", model_name="resnet18")
    assert report.ok
    _assert_loaded(again, state)


def test_checksum_mismatch_is_an_error_and_caches_nothing(
        weights_file, online: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path, _ = weights_file
    served = tmp_path / "served"
    served.mkdir()
    bad_name = "resnet18-00000000.pth"  # the content's SHA-256 does not start with 00000000
    assert not hashlib.sha256(path.read_bytes()).hexdigest().startswith("00000000")
    (served / bad_name).write_bytes(path.read_bytes())
    with serve(served) as (base, requests):
        monkeypatch.setattr(WEIGHTS.value, "url", f"{base}/{bad_name}")
        with pytest.raises(ConfigError, match="does not match the checksum in its name") as e:
            create_model("resnet18", 7, image_size=32, weights="IMAGENET1K_V1")
        assert len(requests) == 1
    assert "\n" not in str(e.value) and str(online / bad_name) in str(e.value)
    assert not online.exists() or list(online.iterdir()) == []  # neither the file nor a partial one


def test_unreachable_url_names_the_cache_path(online: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with serve(tmp_path / "empty") as (base, _):
        monkeypatch.setattr(WEIGHTS.value, "url", f"{base}/resnet18-12345678.pth")  # 404
        with pytest.raises(ConfigError, match="could not download") as e:
            load_pretrained(create_model("resnet18", 7), "torchvision:IMAGENET1K_V1", model_name="resnet18")
    assert str(online / "resnet18-12345678.pth") in str(e.value) and "\n" not in str(e.value)
    assert not online.exists() or list(online.iterdir()) == []


def test_cli_offline_with_empty_cache_is_one_line_naming_the_path(
        online: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(WEIGHTS.value, "url", "http://127.0.0.1:9/resnet18-12345678.pth")  # never contacted
    code = main(["train", "--model", "resnet18", "--pretrained", "torchvision:IMAGENET1K_V1", "--offline",
                 *TINY_TRAIN, "--out", str(tmp_path / "run")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1, err
    assert str(online / "resnet18-12345678.pth") in err[0] and "--offline" in err[0] and "Traceback" not in err[0]
    assert not online.exists()


def test_timm_with_hf_hub_offline_and_empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("DNFER_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    where = tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k"
    with pytest.raises(ConfigError, match="downloading is off .HF_HUB_OFFLINE=1.") as e:  # the API
        create_model("timm:resnet18", 7, image_size=32, weights="timm")
    assert str(where) in str(e.value) and "timm/resnet18.a1_in1k" in str(e.value) and "\n" not in str(e.value)
    code = main(["train", "--model", "timm:resnet18", "--pretrained", "timm", *TINY_TRAIN,  # the CLI, same words
                 "--out", str(tmp_path / "run")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and str(where) in err[0], err
    assert not (tmp_path / "hf").exists() or not where.exists()  # nothing was fetched
