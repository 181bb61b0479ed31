"""Inference (stages/predict.py) runs a network faster than calling it, and must compute the same thing:
BatchNorm folded into the convolutions before it, texts batched by length, every example's output back at
its own index, and the model itself left as it was."""

from __future__ import annotations

import numpy as np
import torch
import torchvision

from stages import text, textnet, zoo
from stages.predict import folded, predict
from stages.splits import to_model_input

from .conftest import tiny_hf_model

IMAGES = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
PRE = zoo.preprocessing("torchvision:mobilenet_v2", 32)


def trained_like_mobilenet() -> torch.nn.Module:
    """MobileNetV2 whose BatchNorm layers hold statistics and scales far from the identity (a fresh one's
    fold would be nearly a no-op)."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=3, width_mult=0.35)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.2, 3.0), (m.weight.data, 0.5, 2.0),
                              (m.bias.data, -0.5, 0.5)):
                t.uniform_(lo, hi)
    return model.eval()


def test_folding_batchnorm_changes_the_speed_not_the_logits_nor_the_model():
    model = trained_like_mobilenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        called = model(to_model_input(IMAGES, PRE)).numpy()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded(model).modules())
    out = predict(model, IMAGES, PRE, batch_size=8)
    assert np.abs(out - called).max() <= 1e-4 * (1 + np.abs(called).max())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    model.train()
    predict(model, IMAGES, PRE)
    assert model.training  # handed back in the mode it came in
    assert folded(model) is model  # BatchNorm in training mode normalises by the batch: nothing to fold


class Branchy(torch.nn.Module):
    """Control flow on the data: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.mean() > 0:
            x = x * 2
        return self.head(x.mean((2, 3)))


def test_a_network_fx_cannot_trace_runs_unfolded_with_the_same_logits():
    model = Branchy().eval()
    assert folded(model) is model
    with torch.no_grad():
        called = model(to_model_input(IMAGES, PRE)).numpy()
    assert np.allclose(predict(model, IMAGES, PRE, batch_size=8), called, atol=1e-6)


def test_texts_run_shortest_first_and_come_back_in_their_own_order(tmp_path):
    texts = np.array(["a much longer text about a dog that barked at the postman all day long", "rye",
                      "bread with butter", "a small dog", "milk", "the cat sat on the warm mat by the door"],
                     dtype=object)
    order = text.batch_order(texts)
    assert [len(t) for t in texts[order]] == sorted(len(t) for t in texts)
    folder = tiny_hf_model(tmp_path / "bert", "bert")
    model = textnet.TextClassifier(textnet.encoder(folder, pretrained=True), "mean", 3).eval()
    pre = zoo.text_preprocessing(folder, 32, "mean")
    together = predict(model, texts, pre, batch_size=2)
    alone = np.concatenate([predict(model, texts[i : i + 1], pre) for i in range(len(texts))])
    assert np.allclose(together, alone, atol=1e-5)
