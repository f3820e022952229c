import dataclasses
import hashlib
import http.server
import threading
from functools import partial

import pytest
import torch

from published_checkpoints import functional_forward, published_state_dict
from selecsls import create_model, get_spec, list_models
from selecsls.models import weights as registry
from selecsls.models.weights import DownloadError, PretrainedWeights, cache_dir, download, get_weights, list_weights
from sparse_models import relative_error


def test_registry_covers_the_published_checkpoints():
    assert list_weights() == [
        "selecsls42b.in1k",
        "selecsls60.in1k",
        "selecsls60b.in1k",
        "selecsls60.xnect_original",
        "selecsls84.xnect_original",
    ]
    for weights in registry.WEIGHTS:
        assert weights.architecture in list_models()
        assert weights.url.endswith("/" + weights.file_name) and weights.source
        assert 70 < weights.top1 < weights.top5 < 100
    assert get_weights("selecsls60") is get_weights("SelecSLS60.in1k")
    assert get_weights("selecsls60.xnect_original").interpolation == "bilinear"
    assert get_weights("selecsls84").tag == "xnect_original"


def test_hash_prefix_comes_from_timm_file_names_when_no_hash_is_published():
    assert get_weights("selecsls42b").hash_prefix == "8af30141"
    assert get_weights("selecsls60.xnect_original").hash_prefix is None
    full = dataclasses.replace(get_weights("selecsls42b"), sha256="ab" * 32)
    assert full.hash_prefix == "ab" * 32


def test_unknown_weights_are_named_with_the_choices():
    with pytest.raises(ValueError, match=r"no published weights named 'selecsls42'; available: selecsls42b.in1k, "):
        get_weights("selecsls42")
    with pytest.raises(ValueError, match=r"no published weights named 'selecsls60.imagenet22k'"):
        create_model("selecsls60.imagenet22k", pretrained=True)
    with pytest.raises(ValueError, match="pass either pretrained=True or checkpoint_path"):
        create_model("selecsls60", pretrained=True, checkpoint_path="x.pth")
    with pytest.raises(ValueError, match="pretrained=True needs a published variant name"):
        create_model(get_spec("selecsls60"), pretrained=True)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(registry.CACHE_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert cache_dir() == tmp_path / "torch" / "selecsls"
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


@pytest.fixture
def served(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, request log)."""
    root = tmp_path / "www"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def publish(root, state, stem="selecsls42b"):
    """Save ``state`` under a torch.hub-style name carrying its sha256 prefix; return (file name, sha256)."""
    tmp = root / "tmp.pth"
    torch.save(state, tmp)
    sha256 = hashlib.sha256(tmp.read_bytes()).hexdigest()
    name = f"{stem}-{sha256[:8]}.pth"
    tmp.rename(root / name)
    return name, sha256


def test_download_over_http_checks_the_hash_and_caches(served, tmp_path):
    root, url, requests = served
    name, _ = publish(root, {"w": torch.arange(5.0)})
    weights = dataclasses.replace(get_weights("selecsls42b"), url=f"{url}/{name}")
    path = download(weights, tmp_path / "cache", progress=False)
    assert path == tmp_path / "cache" / name
    torch.testing.assert_close(torch.load(path, weights_only=True)["w"], torch.arange(5.0))
    assert download(weights, tmp_path / "cache", progress=False) == path
    assert len(requests) == 1, "the second call must use the cache"


def test_corrupt_download_leaves_nothing_in_the_cache(served, tmp_path):
    root, url, _ = served
    name, sha256 = publish(root, {"w": torch.zeros(3)})
    wrong = dataclasses.replace(get_weights("selecsls42b"), url=f"{url}/{name}", sha256="0" * 64)
    with pytest.raises(
        DownloadError, match=f"has sha256 {sha256}, but selecsls42b.in1k is published with sha256 starting 0000"
    ):
        download(wrong, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_corrupt_cached_file_is_reported(tmp_path):
    weights = get_weights("selecsls42b")
    (tmp_path / weights.file_name).write_bytes(b"truncated")
    with pytest.raises(DownloadError, match=r"cached file .* starting 8af30141: .* delete it to download it again"):
        download(weights, tmp_path, progress=False)


def test_offline_error_says_how_to_pass_a_local_file(tmp_path):
    closed_port = dataclasses.replace(get_weights("selecsls60"), url="http://127.0.0.1:9/selecsls60-bbf87526.pth")
    with pytest.raises(DownloadError) as info:
        download(closed_port, tmp_path, progress=False)
    message = str(info.value)
    assert message.startswith(
        "could not download selecsls60.in1k weights from http://127.0.0.1:9/selecsls60-bbf87526.pth"
    )
    assert "create_model('selecsls60', checkpoint_path='/path/to/selecsls60-bbf87526.pth')" in message
    assert f"place it at {tmp_path / 'selecsls60-bbf87526.pth'}" in message


def test_pretrained_true_downloads_loads_and_sets_the_preprocessing(tmp_path, monkeypatch):
    """A registry entry pointing at a file:// URL: the same path as a real download, offline."""
    spec = get_spec("selecsls42b")
    state = published_state_dict(spec, "timm", num_classes=1000)
    name, _ = publish(tmp_path, state)
    entry = PretrainedWeights("selecsls42b", "test", (tmp_path / name).as_uri(), None, 77.0, 93.0, "bicubic", 0.9)
    monkeypatch.setattr(registry, "WEIGHTS", (entry, *registry.WEIGHTS))
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    model = create_model("selecsls42b", pretrained=True).eval()
    assert (tmp_path / "cache" / name).is_file()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(functional_forward(state, spec, x, "timm"), model(x)) <= 1e-4
    cfg = model.pretrained_cfg
    assert (cfg["tag"], cfg["interpolation"], cfg["crop_pct"], cfg["input_size"]) == (
        "selecsls42b.test",
        "bicubic",
        0.9,
        (3, 224, 224),
    )
    with pytest.warns(UserWarning, match="stem weights summed over its input channels"):
        grey = create_model("selecsls42b.test", pretrained=True, in_chans=1, features_only=True)
    assert grey.pretrained_cfg["input_size"] == (1, 224, 224)
