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
    with pytest.raises(ValueError, match=r"finetune\.learning_rate: Extra inputs are not permitted"):
        Params.from_dict(bad)


def test_a_bad_value_fails_naming_the_key():
    bad = raw()
    bad["finetune"]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"finetune\.lr: Input should be greater than 0"):
        Params.from_dict(bad)


def test_a_missing_section_fails_naming_it():
    bad = raw()
    del bad["export"]
    with pytest.raises(ValueError, match=r"export: Field required"):
        Params.from_dict(bad)


def test_digest_ignores_layout_but_not_values():
    a = Params.from_dict(raw())
    reordered = dict(reversed(list(raw().items())))
    assert Params.from_dict(reordered).digest() == a.digest()
    changed = raw()
    changed["finetune"]["epochs"] += 1
    assert Params.from_dict(changed).digest() != a.digest()


def test_params_are_frozen():
    params = Params.from_dict(raw())
    with pytest.raises(Exception, match="frozen"):
        params.finetune.lr = 1.0
