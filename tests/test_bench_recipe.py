"""bench/recipe.py's development split: examples prepare did not draw, disjoint from train, validation and test
(copies included), so tuning on it never looks at the test set."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest

from bench.recipe import development_split, variant_params
from stages import prepare
from stages.params import Params
from stages.splits import load_split

from .conftest import tiny_params


def _keys(split) -> set:
    return {x.tobytes() if isinstance(x, np.ndarray) else x for x in split.x}


def test_images_with_their_own_test_split(tmp_path, tiny_source):
    params = Params.load(tiny_params(tmp_path, tiny_source))
    prepare.run(tiny_source, params.paths.prepared, params.prepare)
    dev = development_split(params, params.paths.prepared, 5)
    assert np.bincount(dev.y, minlength=10).tolist() == [5] * 10
    for name in ("train", "val", "test"):
        assert not _keys(dev) & _keys(load_split(params.paths.prepared, name)), name
    with pytest.raises(SystemExit, match=r"too few unused examples \('T-shirt/top' has 14, "):  # 20 - (4 + 2) left
        development_split(params, params.paths.prepared, 15)


def test_texts_drawn_from_the_pool_without_copies_of_prepared_examples(tmp_path, tiny_source):
    source = tmp_path / "texts.csv"
    with source.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for label in ("a", "b", "c"):
            for i in range(40):  # every text twice: copies of train/val/test texts are bound to be drawn
                w.writerow([f"{label} example {i % 20}", label])
    params = Params.load(tiny_params(tmp_path, tiny_source))
    params = dataclasses.replace(params, paths=dataclasses.replace(params.paths, source=source),
                                 prepare=dataclasses.replace(params.prepare, dataset="text-table", leakage="remove"))
    prepare.run(source, params.paths.prepared, params.prepare)
    dev = development_split(params, params.paths.prepared, 10)
    prepared = set().union(*(_keys(load_split(params.paths.prepared, n)) for n in ("train", "val", "test")))
    assert len(dev.y) > 0 and not _keys(dev) & prepared
    assert len(dev.y) < 30  # some of the 30 drawn were copies and were dropped


def test_variants_are_checked_like_params_yaml(tmp_path, tiny_source):
    params = Params.load(tiny_params(tmp_path, tiny_source))
    assert variant_params(params, ["finetune.lr=5.0e-5", "model.pooling=cls"]).finetune.lr == 5e-5
    with pytest.raises(SystemExit, match="no finetune.lrr"):
        variant_params(params, ["finetune.lrr=1.0"])
    with pytest.raises(SystemExit, match="key=value"):
        variant_params(params, ["finetune.lr"])
    with pytest.raises(ValueError, match="pooling"):
        variant_params(params, ["model.pooling=max"])
