"""Domain-adaptive pre-training (stages/dapt.py) on tiny data: a tiny BERT continues masked-language-model
training on real WordNet glosses (never the validation or test ones), the result is a model folder the
zoo loads and locks, and fine-tuning from it goes through the usual stages."""

from __future__ import annotations

import json

import pytest
import yaml

from stages import dapt, finetune, prepare, weights, zoo
from stages.params import Params

from .conftest import tiny_hf_model
from .test_byo_e2e import gloss_table, write_params

pytestmark = pytest.mark.slow


def test_dapt_continues_mlm_training_without_the_held_out_texts_and_the_result_fine_tunes(tmp_path):
    base = tiny_hf_model(tmp_path / "tiny-bert", "bert")
    lock = tmp_path / "weights.lock"
    weights.lock(weights.find_weights(f"hf:{base}"), lock)
    path = write_params(tmp_path, gloss_table(tmp_path / "glosses.csv", 30),
                        prepare={"dataset": "text-table", "per_class": 6, "val_per_class": 3, "test_per_class": 5},
                        dapt={"base": f"hf:{base}", "steps": 40, "batch_size": 8, "lr": 1.0e-3, "eval_texts": 20,
                              "max_length": 32},
                        finetune={"augment": False, "lr": 1.0e-3})
    raw = yaml.safe_load(path.read_text())
    raw["paths"]["weights_lock"] = str(lock)
    raw["model"].update(name=f"hf:{raw['paths']['dapt']}", max_length=32)
    path.write_text(yaml.safe_dump(raw))
    params = Params.load(path)

    prepare.main(["--params", str(path)])
    texts = dapt.texts_for(params.paths.source, params.prepare, params.paths.prepared)
    assert len(texts) == 3 * (30 - 3 - 5)  # every gloss but the validation and test ones
    dapt.main(["--params", str(path)])
    report = json.loads(params.paths.dapt_metrics.read_text())
    assert report["n_texts"] + report["n_held_out"] == len(texts)
    # 40 steps at lr 1e-3 on ~50 glosses: a random tiny BERT learns the glosses' token statistics
    assert report["held_out_mlm_loss_after"] < report["held_out_mlm_loss_before"]
    entry = json.loads(lock.read_text())[params.model.name]
    assert entry["source"] == "local folder" and "model.safetensors" in entry["files"] and "tokenizer.json" in entry["files"]
    adapted = zoo.load(params.model, 3, lock).model.encoder.state_dict()
    original = zoo.load(params.model.__class__(name=f"hf:{base}"), 3, lock).model.encoder.state_dict()
    assert set(adapted) == set(original)  # the same encoder, pooler included: only the numbers moved
    assert not all((adapted[k] == original[k]).all() for k in adapted if "pooler" not in k)
    assert all((adapted[k] == original[k]).all() for k in adapted if "pooler" in k)

    finetune.main(["--params", str(path)])
    meta = json.loads((params.paths.finetuned / "model.json").read_text())
    assert meta["pretrained_from"] == params.model.name and meta["pretrained_sha256"] == report["weights_sha256"]
