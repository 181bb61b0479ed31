"""Choose the pre-trained model before training: score each candidate in select.candidates on the prepared
training data without fine-tuning it, and keep the best.

Two scores per candidate, both on frozen features (what the head of the network would receive):
  logme         LogME (You et al. 2021): the log marginal evidence of a Bayesian linear model from the
                features to each one-hot label column, maximised over its prior and noise precisions by
                the paper's fixed-point iteration, averaged over classes and divided by the number of
                examples. Higher: the labels are more linearly predictable from the features.
  knn_accuracy  k-nearest-neighbour accuracy (cosine) on a held-out fifth of the training split (stratified,
                fixed seed), the other four fifths as neighbours: what the features give with no fitting.
Only the training split is read, so the scores cost one forward pass over it per candidate.
A candidate headstart pre-trained itself (stages/pretrain.py) also gets `domain_shift`: proxy A-distance
and an MMD permutation test between its held-out source examples and the target's training examples, in
its frozen feature space (stages/shift.py): a large shift warns of negative transfer before training.
Candidates: model names as in model.name (timm:..., hf:..., local:...), `random:<name>` for the same
network with random weights (what "no transfer" scores), and `tfidf` for TF-IDF features of the text
(the tokenizer of the first text candidate). The choice is the pre-trained candidate with the highest
logme. paths.chosen_model names the model finetune and baseline load: that choice when model.name is
`auto`, else model.name (it changes only when that model does, so it retrains nothing otherwise).
Reads paths.prepared; writes paths.select_metrics and paths.chosen_model.
Run: dvc repro select   (or: python -m stages.select)"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.files import read_json, write_json
from stages.modality import adapter
from stages.params import ModelParams, SelectParams, cli
from stages.splits import Split, load_split

RANDOM = "random:"
TFIDF = "tfidf"


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 100, tol: float = 1e-5) -> float:
    """LogME score of `features` (n x d) for integer `labels`: mean over classes of the maximised log
    evidence, divided by n. Uses the SVD of the features, so each fixed-point step costs O(d)."""
    f = np.asarray(features, dtype=np.float64)
    n, _ = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2  # eigenvalues of F^T F (the non-zero ones)
    scores = []
    for k in np.unique(labels):
        y = (labels == k).astype(np.float64)
        evidence, _, _ = _maximise_evidence(u, sigma, y, n, f.shape[1], max_iter, tol)
        scores.append(evidence / n)
    return float(np.mean(scores))


def _maximise_evidence(u, sigma, y, n, d, max_iter, tol) -> tuple[float, float, float]:
    """The fixed-point iteration of You et al. (Algorithm 1): (log evidence, alpha, beta) at convergence."""
    z = u.T @ y  # y in the basis of the left singular vectors
    z2 = z**2
    rest = float(y @ y - z2.sum())  # the part of y outside the span of the features
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * z2 / (sigma + t) ** 2).sum())  # ||m||^2
        res2 = float((z2 * (t / (sigma + t)) ** 2).sum()) + rest  # ||F m - y||^2
        alpha_new, beta_new = gamma / max(m2, 1e-12), max(n - gamma, 1e-12) / max(res2, 1e-12)
        done = abs(alpha_new / beta_new - t) / t < tol
        alpha, beta = alpha_new, beta_new
        if done:
            break
    return evidence(sigma, z2, rest, n, d, alpha, beta), alpha, beta


def evidence(sigma, z2, rest, n, d, alpha, beta) -> float:
    """log p(y | F, alpha, beta) of Bayesian linear regression, from F^T F's eigenvalues `sigma` and y's
    squared coordinates `z2` along the left singular vectors (plus `rest` outside their span)."""
    sigma_all = np.concatenate([sigma, np.zeros(d - len(sigma))])  # F^T F's zero eigenvalues when d > n
    t = alpha / beta
    m2 = float((sigma * z2 / (sigma + t) ** 2).sum())
    res2 = float((z2 * (t / (sigma + t)) ** 2).sum()) + rest
    log_det_a = float(np.log(alpha + beta * sigma_all).sum())
    return (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
            - beta / 2 * res2 - alpha / 2 * m2 - log_det_a / 2)


def knn_accuracy(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, test_y: np.ndarray, k: int) -> float:
    """Majority vote of the k nearest training examples by cosine similarity (ties: the nearest's class)."""
    a = train_f / np.maximum(np.linalg.norm(train_f, axis=1, keepdims=True), 1e-12)
    b = test_f / np.maximum(np.linalg.norm(test_f, axis=1, keepdims=True), 1e-12)
    nearest = np.argsort(-(b @ a.T), axis=1)[:, :k]
    votes = train_y[nearest]
    classes = int(max(train_y.max(), test_y.max())) + 1
    counts = np.stack([np.bincount(row, minlength=classes) for row in votes]).astype(float)
    counts[np.arange(len(votes)), votes[:, 0]] += 0.5  # a tie goes to the nearest neighbour's class
    return float((counts.argmax(1) == test_y).mean())


def holdout(labels: np.ndarray, share: float = 0.2, seed: int = 0) -> np.ndarray:
    """A stratified boolean mask of `share` of each class (at least one example of each)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        mask[idx[: max(1, round(share * len(idx)))]] = True
    return mask


def candidate_features(name: str, model_p: ModelParams, n_classes: int, train: Split,
                       weights_lock: Path, text_files: Path | None, seed: int = 0) -> np.ndarray:
    """Frozen features of the training split under candidate `name`."""
    if name == TFIDF:
        return _tfidf_features(train, model_p, text_files)
    from stages import zoo
    from stages.predict import predict

    from stages.train import seed_everything

    pretrained = not name.startswith(RANDOM)
    m = candidate_model(name, model_p)
    seed_everything(seed)  # a random twin's weights (and a new head's) come from the global generator
    loaded = zoo.load(m, n_classes, weights_lock, pretrained=pretrained)
    return predict(loaded.model, train.x, loaded.pre, fn=zoo.features, desc=f"{name} features")


def candidate_model(name: str, model_p: ModelParams) -> ModelParams:
    """The model settings candidate `name` loads with: model.weights (a local file or folder) belongs to
    model.name only, never to the other candidates."""
    from stages.weights import AUTO, canonical

    base = name.removeprefix(RANDOM)
    own = model_p.weights if model_p.name != AUTO and canonical(base) == canonical(model_p.name) else None
    return dataclasses.replace(model_p, name=base, weights=own)


def unavailable(name: str, model_p: ModelParams, weights_lock: Path) -> str | None:
    """Why candidate `name`'s pre-trained weights cannot be used on this machine (not found, not in the
    weights lock, or not the files it pins), in one line; None when they can, or when it needs none."""
    from stages.weights import find_weights, verify

    if name == TFIDF or name.startswith(RANDOM):
        return None
    m = candidate_model(name, model_p)
    try:
        verify(find_weights(m.name, m.weights, m.allow_download, m.revision), weights_lock)
    except (FileNotFoundError, LookupError, ValueError) as e:
        return " ".join(line.strip() for line in str(e).splitlines())
    return None


def domain_shift(name: str, model_p: ModelParams, n_classes: int, f_target: np.ndarray, weights_lock: Path,
                 seed: int = 0) -> dict[str, Any] | None:
    """How far the target's training examples (`f_target`: their features under this candidate, as scored
    above) are from the candidate's own source examples, in the candidate's frozen feature space: proxy
    A-distance and an MMD permutation test (stages/shift.py).
    None unless the candidate is a pre-trained headstart checkpoint that carries its source examples."""
    from stages import checkpoint, weights, zoo
    from stages.predict import predict
    from stages.shift import mmd_permutation_test, proxy_a_distance

    if name.startswith(RANDOM) or name == TFIDF or weights.family_of(name) != "local":
        return None
    folder = weights.find_weights(name, model_p.weights).path
    held = checkpoint.source_test(folder)
    if held is None:
        return None
    loaded = zoo.load(dataclasses.replace(model_p, name=name), n_classes, weights_lock)
    f_source = predict(loaded.model, held.x, loaded.pre, fn=zoo.features, desc=f"{name} source features")
    mmd, p = mmd_permutation_test(f_source, f_target, seed=seed)
    return {"proxy_a_distance": round(proxy_a_distance(f_source, f_target, seed=seed), 4), "mmd2": round(mmd, 6),
            "mmd_p_value": round(p, 4), "n_source": int(len(held.y)), "n_target": int(len(f_target))}


def _tfidf_features(train: Split, model_p: ModelParams, text_files: Path | None) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from stages.text import word_piece_ids

    if text_files is None:
        raise ValueError("select candidate tfidf needs a text candidate (hf:...) listed before it, for its tokenizer")
    ids = word_piece_ids(train.x, {"files": text_files, "max_length": model_p.max_length})
    return TfidfVectorizer(analyzer=lambda row: row, lowercase=False).fit_transform(ids).toarray()


def modality_of(name: str) -> str:
    """"text" or "image": what data candidate `name` reads."""
    from stages import zoo
    from stages.weights import family_of

    base = name.removeprefix(RANDOM)
    if base == TFIDF or family_of(base) == "hf":
        return "text"
    if family_of(base) == "local":
        meta = read_json(Path(base.split(":", 1)[1]) / "model.json")
        return zoo.modality(meta["preprocessing"])
    return "image"


def run(prepared: Path, out: Path, model_p: ModelParams, p: SelectParams, weights_lock: Path,
        chosen_out: Path | None = None) -> dict[str, Any]:
    from stages.weights import find_weights
    from stages.zoo import AUTO

    manifest = read_json(Path(prepared) / "manifest.json")
    classes, data_modality = manifest["classes"], manifest.get("modality", "image")
    train = load_split(prepared, "train")
    held = holdout(train.y, seed=p.seed)
    began = time.perf_counter()
    scores: dict[str, dict[str, Any]] = {}
    text_files = None
    for name in p.candidates:
        if modality_of(name) != data_modality:  # e.g. the image list left in place for a text dataset
            scores[name] = {"skipped": f"a {modality_of(name)} model; the prepared data is {data_modality}"}
            print(f"{name}: skipped ({scores[name]['skipped']})")
            continue
        why = unavailable(name, model_p, weights_lock)
        if why is not None:  # listed with the reason, and the others are still scored
            scores[name] = {"skipped": why}
            print(f"{name}: skipped: {why}")
            continue
        start = time.perf_counter()
        f_train = candidate_features(name, model_p, len(classes), train, weights_lock, text_files, p.seed)
        if text_files is None and name.removeprefix(RANDOM).startswith("hf:"):
            m = candidate_model(name, model_p)
            text_files = find_weights(m.name, m.weights, m.allow_download, m.revision).path
        held_out = knn_accuracy(f_train[~held], train.y[~held], f_train[held], train.y[held], p.knn_k)
        scores[name] = {
            "logme": round(logme(f_train, train.y), 6),
            "knn_accuracy": round(held_out, 6),
            "feature_dim": int(f_train.shape[1]),
            "seconds": round(time.perf_counter() - start, 2),
        }
        print(f"{name}: LogME {scores[name]['logme']:.4f}, {p.knn_k}-NN held-out accuracy "
              f"{scores[name]['knn_accuracy']:.4f} ({scores[name]['seconds']:.1f} s)")
        shift = domain_shift(name, model_p, len(classes), f_train, weights_lock, p.seed)
        if shift is not None:  # before any training: is the source like the target at all?
            scores[name]["domain_shift"] = shift
            print(f"{name}: domain shift source -> target: proxy A-distance {shift['proxy_a_distance']:.2f} (0 same, "
                  f"2 disjoint), MMD^2 {shift['mmd2']:.4f} (permutation p = {shift['mmd_p_value']:.3g})")
    scored = [n for n in scores if "logme" in scores[n]]
    eligible = [n for n in scored if n != TFIDF and not n.startswith(RANDOM)]  # only these can be fine-tuned
    if not eligible and model_p.name == AUTO:
        raise ValueError(f"model.name is auto but select.candidates has no pre-trained {data_modality} model to "
                         f"choose (random: and tfidf entries are references): add one, e.g. "
                         f"{adapter(data_modality).EXAMPLE_MODEL}")
    chosen = max(eligible, key=lambda n: scores[n]["logme"]) if eligible else None
    result = {"candidates": scores, "chosen": chosen, "chosen_by": "logme",
              "ranking": sorted(scored, key=lambda n: -scores[n]["logme"]),
              "seconds": round(time.perf_counter() - began, 2), "n_train": int(len(train.y))}
    write_json(out, result)
    print(f"chosen: {chosen} (highest LogME of the pre-trained candidates) -> {out}" if chosen else
          f"no pre-trained {data_modality} candidate to choose from -> {out}")
    if chosen_out is not None:
        use = chosen if model_p.name == AUTO else model_p.name
        write_json(chosen_out, {"model": use, "by": "select (model.name: auto)" if model_p.name == AUTO else "model.name"})
        print(f"{'model.name is auto: ' if model_p.name == AUTO else ''}finetune and baseline use {use} -> {chosen_out}")
    return result


def main(argv: list[str] | None = None) -> None:
    params = cli(__doc__, argv)
    paths = params.paths
    run(paths.prepared, paths.select_metrics, params.model, params.select, paths.weights_lock, paths.chosen_model)


if __name__ == "__main__":
    main()
