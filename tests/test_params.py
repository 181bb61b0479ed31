import dataclasses
from pathlib import Path

import pytest
import yaml

from stages.params import Params

from .conftest import ROOT


def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_the_shipped_params_file_is_valid():
    params = Params.load(ROOT / "params.yaml")
    assert params.prepare.per_class == 100
    assert params.paths.prepared == Path("data/prepared")


def test_a_misspelt_key_fails_naming_it():
    bad = raw()
    bad["finetune"]["learning_rate"] = bad["finetune"].pop("lr")
    with pytest.raises(ValueError, match=r"finetune\.learning_rate: unknown key"):
        Params.from_dict(bad)


def test_a_bad_value_fails_naming_the_key():
    bad = raw()
    bad["finetune"]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"finetune\.lr: must be > 0, got -1.0"):
        Params.from_dict(bad)


def test_a_missing_section_fails_naming_it():
    bad = raw()
    del bad["export"]
    with pytest.raises(ValueError, match=r"export: required"):
        Params.from_dict(bad)


def test_digest_ignores_layout_but_not_values():
    a = Params.from_dict(raw())
    reordered = dict(reversed(list(raw().items())))
    assert Params.from_dict(reordered).digest() == a.digest()
    changed = raw()
    changed["finetune"]["epochs"] = 11
    assert Params.from_dict(changed).digest() != a.digest()


def test_params_are_frozen():
    params = Params.from_dict(raw())
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.finetune.lr = 1.0


def test_a_float_written_without_a_dot_gets_a_helpful_error():
    bad = raw()
    bad["finetune"]["lr"] = "1e-3"  # what PyYAML makes of `lr: 1e-3`
    with pytest.raises(ValueError, match=r"finetune\.lr: expected a number, got the string '1e-3' \(YAML needs a dot"):
        Params.from_dict(bad)


def test_a_near_miss_key_gets_a_suggestion_and_all_problems_are_listed_at_once():
    bad = raw()
    bad["prepare"]["per_clas"] = bad["prepare"].pop("per_class")
    bad["finetune"]["epochs"] = 0
    bad["finetune"]["lr"] = "fast"
    with pytest.raises(ValueError) as e:
        Params.from_dict(bad)
    assert "prepare.per_clas: unknown key (did you mean per_class?)" in str(e.value)
    assert "finetune.epochs: must be >= 1, got 0" in str(e.value)
    assert "finetune.lr: expected a number, got the string 'fast'" in str(e.value)  # or auto, it goes on


def test_wrong_types_are_named():
    bad = raw()
    bad["finetune"]["augment"] = "yes"
    bad["finetune"]["probe_c"] = 1.0
    with pytest.raises(ValueError) as e:
        Params.from_dict(bad)
    assert ("finetune.augment: expected bool or 'auto' or 'none' or 'flip' or 'flip_shift' or 'crop', got 'yes'"
            in str(e.value))
    assert "finetune.probe_c: expected a list, got 1.0" in str(e.value)


@pytest.mark.parametrize(("seeds", "message"), [
    (0, r"evaluate\.seeds: must be >= 1, got 0"),
    (2.5, r"evaluate\.seeds: expected int, got 2\.5"),
    ("3", r"evaluate\.seeds: expected int, got '3'"),
])
def test_evaluate_seeds_must_be_a_whole_number_of_at_least_one(seeds, message):
    bad = raw()
    bad["evaluate"]["seeds"] = seeds
    with pytest.raises(ValueError, match=message):
        Params.from_dict(bad)
