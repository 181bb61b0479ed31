import numpy as np
import pytest
import torch

from stages import zoo


def test_map_by_position_renames_and_checks_shapes():
    src = {"_conv.weight": torch.ones(2, 3), "_bn.bias": torch.zeros(2)}
    tgt = {"conv.weight": torch.empty(2, 3), "bn.bias": torch.empty(2)}
    mapped = zoo.map_by_position(src, tgt)
    assert list(mapped) == ["conv.weight", "bn.bias"]
    assert torch.equal(mapped["conv.weight"], src["_conv.weight"])


def test_map_by_position_refuses_a_different_architecture():
    with pytest.raises(ValueError, match=r"tensor 1: _bn.bias has shape \(3,\) but bn.bias needs \(2,\)"):
        zoo.map_by_position({"a": torch.ones(2), "_bn.bias": torch.ones(3)}, {"x": torch.ones(2), "bn.bias": torch.ones(2)})
    with pytest.raises(ValueError, match="1 tensors, the model 2"):
        zoo.map_by_position({"a": torch.ones(2)}, {"x": torch.ones(2), "y": torch.ones(2)})


def test_packaged_efficientnet_weights_load_into_timm_unchanged():
    pre = zoo.preprocessing("efficientnet_lite0", 64)
    model, sha = zoo.pretrained("efficientnet_lite0", 10, pre)
    assert sha == zoo.OFFLINE_WEIGHTS["efficientnet_lite0"].sha256
    source = torch.load(zoo.OFFLINE_WEIGHTS["efficientnet_lite0"].path(), weights_only=True)
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(model.blocks[6][0].conv_pw.weight, source["_blocks.15._expand_conv.weight"])
    assert model.get_classifier().out_features == 10  # the ImageNet head is replaced
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_pretrained_features_separate_classes_better_than_random_ones():
    # A behavioural check of the key mapping: ImageNet features of a bright square and of a stripe
    # pattern differ far more, relative to their spread, than those of the same net with random weights.
    from stages.train import predict

    pre = zoo.preprocessing("efficientnet_lite0", 64)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, (16, 28, 28)).astype(np.uint8)
    x[:8, 8:20, 8:20] = 250
    x[8:, :, ::4] = 250
    trained, _ = zoo.pretrained("efficientnet_lite0", 2, pre)
    torch.manual_seed(0)
    random = zoo.build("efficientnet_lite0", 2, pre).eval()

    def separation(model):
        f = predict(model, x, pre, fn=zoo.features)
        gap = np.linalg.norm(f[:8].mean(0) - f[8:].mean(0))
        return gap / (f[:8].std(0).mean() + f[8:].std(0).mean())

    assert separation(trained) > 2 * separation(random)


def test_a_tampered_weight_file_is_refused(monkeypatch):
    spec = zoo.OFFLINE_WEIGHTS["efficientnet_lite0"]
    monkeypatch.setitem(zoo.OFFLINE_WEIGHTS, "efficientnet_lite0", zoo.OfflineWeights(spec.package, "0" * 64, "positional"))
    with pytest.raises(ValueError, match="does not match the pinned"):
        zoo.pretrained("efficientnet_lite0", 10, zoo.preprocessing("efficientnet_lite0", 64))


def test_checkpoint_round_trip(tmp_path):
    pre = zoo.preprocessing(zoo.PIXEL_LINEAR, 28)
    model = zoo.build(zoo.PIXEL_LINEAR, 3, pre)
    zoo.save_checkpoint(tmp_path / "ckpt", model, {"architecture": zoo.PIXEL_LINEAR, "classes": ["a", "b", "c"],
                                                   "preprocessing": pre})
    loaded, meta = zoo.load_checkpoint(tmp_path / "ckpt")
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))
    assert meta["classes"] == ["a", "b", "c"]
    assert not loaded.training


def test_an_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="not a timm architecture"):
        zoo.build("no_such_net", 10, {"image_size": 32, "channels": 3})
