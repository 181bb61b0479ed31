"""Model selection before training (stages/select.py): LogME against a direct evaluation of the evidence,
k-NN, and the stage on tiny data with the real pre-trained candidates and a random twin."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stages import select, zoo
from stages.params import Params

from .conftest import tiny_params


def direct_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) written out from its definition (You et al. 2021, eq. 2-3)."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    return float(n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
                 - beta / 2 * np.sum((f @ m - y) ** 2) - alpha / 2 * m @ m - np.linalg.slogdet(a)[1] / 2)


@pytest.mark.parametrize("n,d", [(40, 6), (80, 25), (12, 30)])  # more examples than features, and fewer
def test_fixed_point_reaches_the_maximum_of_the_directly_computed_evidence(n, d):
    rng = np.random.default_rng(n)
    f = rng.normal(size=(n, d))
    y = f @ rng.normal(size=d) / np.sqrt(d) + 0.3 * rng.normal(size=n)  # a finite optimum exists for both shapes
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    z2 = (u.T @ y) ** 2
    ev, alpha, beta = select._maximise_evidence(u, s**2, y, n, d, max_iter=500, tol=1e-10)
    assert ev == pytest.approx(direct_evidence(f, y, alpha, beta), rel=1e-9)
    assert select.evidence(s**2, z2, float(y @ y - z2.sum()), n, d, alpha, beta) == pytest.approx(ev)
    if n > d:  # (with fewer examples than features the noise-free fit wins: beta grows without bound)
        for da, db in [(1.2, 1), (1 / 1.2, 1), (1, 1.2), (1, 1 / 1.2)]:  # a maximum: every step away is lower
            assert direct_evidence(f, y, alpha * da, beta * db) < ev


def test_logme_prefers_features_that_carry_the_labels():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 25)
    informative = np.eye(4)[y] * 3 + rng.normal(size=(100, 4))
    noise = rng.normal(size=(100, 4))
    assert select.logme(np.hstack([informative, noise]), y) > select.logme(np.hstack([noise, rng.normal(size=(100, 4))]), y)


def test_knn_votes_with_cosine_neighbours():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]])
    ty = np.array([0, 0, 1, 1])
    assert select.knn_accuracy(train, ty, np.array([[5, 0.2], [0.1, 3]]), np.array([0, 1]), k=3) == 1.0


def test_select_scores_every_candidate_and_chooses_a_pretrained_one(tiny_source, tmp_path):
    import dataclasses

    # (which one ranks first on real data is measured by the stage on Fashion-MNIST and WordNet: README;
    # on these synthetic stripes random convolutions do as well as ImageNet features)
    from stages.prepare import run as prepare

    params = Params.load(tiny_params(tmp_path, tiny_source))
    prepare(params.paths.source, params.paths.prepared, params.prepare)
    result = select.run(params.paths.prepared, tmp_path / "select.json", params.model, params.select,
                        params.paths.weights_lock)
    assert json.loads((tmp_path / "select.json").read_text()) == result
    # the four ImageNet networks installed offline and EfficientNet-Lite0's random twin, every one scored
    assert list(result["candidates"]) == params.select.candidates and len(params.select.candidates) == 5
    assert result["chosen"] in params.select.candidates[:4]  # a random network is a reference, never the choice
    assert sorted(result["ranking"]) == sorted(result["candidates"])
    for scores in result["candidates"].values():
        assert scores["seconds"] > 0 and 0 <= scores["knn_accuracy"] <= 1 and scores["feature_dim"] == 1280
    twin = "random:timm:efficientnet_lite0"
    again = select.run(params.paths.prepared, tmp_path / "again.json", params.model,
                       dataclasses.replace(params.select, candidates=[twin]), params.paths.weights_lock)
    # seeded: the random twin is the same network each time
    assert (again["candidates"][twin]["logme"], again["candidates"][twin]["knn_accuracy"]) == (
        result["candidates"][twin]["logme"], result["candidates"][twin]["knn_accuracy"])


def test_auto_uses_the_choice_and_says_what_to_run_when_there_is_none(tiny_source, tmp_path):
    import dataclasses

    from stages.prepare import run as prepare

    params = Params.load(tiny_params(tmp_path, tiny_source))
    auto = dataclasses.replace(params.model, name="auto")
    chosen = tmp_path / "chosen_model.json"
    with pytest.raises(FileNotFoundError, match="run the select stage first"):
        zoo.resolve(auto, chosen)
    assert zoo.resolve(params.model, chosen) == params.model  # a named model needs no choice
    prepare(params.paths.source, params.paths.prepared, params.prepare)
    p = dataclasses.replace(params.select, candidates=["random:timm:efficientnet_lite0", "timm:efficientnet_lite0"])
    select.run(params.paths.prepared, tmp_path / "select.json", auto, p, params.paths.weights_lock, chosen)
    assert json.loads(chosen.read_text()) == {"model": "timm:efficientnet_lite0", "by": "select (model.name: auto)"}
    assert zoo.resolve(auto, chosen).name == "timm:efficientnet_lite0"
    # a named model is passed through, whatever select scored
    select.run(params.paths.prepared, tmp_path / "select.json", params.model, p, params.paths.weights_lock, chosen)
    assert json.loads(chosen.read_text())["model"] == params.model.name


def test_candidates_for_another_modality_are_skipped_with_the_reason(tiny_source, tmp_path):
    import dataclasses

    from stages.prepare import run as prepare

    params = Params.load(tiny_params(tmp_path, tiny_source))
    prepare(params.paths.source, params.paths.prepared, params.prepare)
    p = dataclasses.replace(params.select, candidates=["hf:sentence-transformers/all-MiniLM-L6-v2", "tfidf"])
    result = select.run(params.paths.prepared, tmp_path / "s.json", params.model, p, params.paths.weights_lock,
                        tmp_path / "chosen.json")
    assert result["candidates"]["tfidf"] == {"skipped": "a text model; the prepared data is image"}
    assert result["chosen"] is None and json.loads((tmp_path / "chosen.json").read_text())["model"] == params.model.name
    with pytest.raises(ValueError, match="no pre-trained image model to choose"):
        select.run(params.paths.prepared, tmp_path / "s.json", dataclasses.replace(params.model, name="auto"), p,
                   params.paths.weights_lock, tmp_path / "chosen.json")


def test_a_candidate_without_usable_weights_is_listed_as_skipped_with_the_reason(tiny_source, tmp_path):
    """Weights that are not on this machine, or not the files the weights lock pins, skip that candidate with
    the reason in select.json; the others are scored and the choice is made among them."""
    import dataclasses

    from stages.prepare import run as prepare

    params = Params.load(tiny_params(tmp_path, tiny_source))
    prepare(params.paths.source, params.paths.prepared, params.prepare)
    lock = json.loads(params.paths.weights_lock.read_text())
    [file] = lock["timm:efficientnet_lite1"]["files"]
    lock["timm:efficientnet_lite1"]["files"][file] = "0" * 64  # another file than the one installed
    tampered = tmp_path / "weights.lock"
    tampered.write_text(json.dumps(lock))
    p = dataclasses.replace(params.select, candidates=["timm:resnet18", "timm:efficientnet_lite1",
                                                       "timm:efficientnet_lite0"])
    result = select.run(params.paths.prepared, tmp_path / "s.json", dataclasses.replace(params.model, name="auto"),
                        p, tampered, tmp_path / "chosen.json")
    skipped = {name: c["skipped"] for name, c in result["candidates"].items() if "skipped" in c}
    assert set(skipped) == {"timm:resnet18", "timm:efficientnet_lite1"}
    assert skipped["timm:resnet18"].startswith("no pre-trained weights for timm:resnet18")
    assert "differ from the sha256 recorded in" in skipped["timm:efficientnet_lite1"]
    assert result["chosen"] == "timm:efficientnet_lite0" and result["ranking"] == ["timm:efficientnet_lite0"]
    assert json.loads((tmp_path / "s.json").read_text())["candidates"]["timm:resnet18"]["skipped"] == skipped["timm:resnet18"]
