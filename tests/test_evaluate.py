"""Time to accuracy on hand-written training histories, and the evaluate stage on tiny linear models carrying it."""

import json

import numpy as np
import pytest
import torch

from stages import checkpoint, evaluate, zoo
from stages.files import write_json
from stages.params import EvaluateParams
from stages.speedup import describe_time, time_to_accuracy, time_to_reach
from stages.splits import Split, save_split
from stages.train import write_history


def history(*rows: tuple[int, float, float]) -> list[dict[str, float]]:
    """(epoch, val_accuracy, cumulative seconds) rows, in write_history's columns."""
    return [{"epoch": e, "train_loss": 1.0, "train_accuracy": 0.5, "val_accuracy": v, "lr": 1e-3, "seconds": s}
            for e, v, s in rows]


# fine-tuned reaches scratch's best (0.76) at epoch 3, exactly; scratch first gets there at epoch 4 and again at
# 6, in a longer history; scratch never reaches fine-tuned's best (0.87)
FINETUNED = history((1, 0.50, 10.0), (2, 0.73, 20.0), (3, 0.76, 30.0), (4, 0.87, 40.0))
SCRATCH = history((1, 0.26, 12.0), (2, 0.55, 24.0), (3, 0.71, 36.0), (4, 0.76, 48.0), (5, 0.75, 60.0), (6, 0.76, 72.0))


def test_fine_tuned_reaching_scratchs_best_counts_the_first_epoch_at_or_above_it():
    t = time_to_reach("finetuned", FINETUNED, "scratch", SCRATCH)
    assert t["val_accuracy"] == 0.76 and t["reason"] is None
    assert t["finetuned"] == {"epoch": 3, "seconds": 30.0}  # 0.76 >= 0.76: a tie with the bar is reaching it
    assert t["scratch"] == {"epoch": 4, "seconds": 48.0}  # its first epoch at its best, not the later tie at 6
    assert t["speedup"] == pytest.approx(48 / 30) and t["epoch_speedup"] == pytest.approx(4 / 3, abs=1e-3)
    assert describe_time(t) == ("time to scratch's best (val 0.76): fine-tuned 30.0 s / 3 epochs vs scratch "
                                "48.0 s / 4 epochs: 1.6x faster")


def test_a_model_that_never_reaches_the_bar_has_no_time_and_a_reason():
    t = time_to_reach("scratch", SCRATCH, "finetuned", FINETUNED)
    assert t["val_accuracy"] == 0.87 and t["finetuned"] == {"epoch": 4, "seconds": 40.0}
    assert t["scratch"] is None and t["speedup"] is None and t["epoch_speedup"] is None
    assert t["reason"] == "scratch never reached 0.8700: its own best was 0.7600 in 6 epochs, 72.0 s"
    assert describe_time(t) == f"time to fine-tuned's best (val 0.87): {t['reason']}"


def test_equal_bests_are_reached_both_ways_and_the_slower_one_is_called_slower():
    finetuned = history((1, 0.80, 10.0), (2, 0.80, 20.0))
    scratch = history((1, 0.50, 10.0), (2, 0.80, 30.0), (3, 0.79, 45.0))
    there = time_to_reach("finetuned", finetuned, "scratch", scratch)
    back = time_to_reach("scratch", scratch, "finetuned", finetuned)
    assert (there["finetuned"], there["scratch"], there["speedup"], there["epoch_speedup"]) == (
        {"epoch": 1, "seconds": 10.0}, {"epoch": 2, "seconds": 30.0}, 3.0, 2.0)
    assert (back["scratch"], back["finetuned"], back["speedup"], back["epoch_speedup"]) == (
        {"epoch": 2, "seconds": 30.0}, {"epoch": 1, "seconds": 10.0}, pytest.approx(1 / 3, abs=1e-3), 0.5)
    assert describe_time(back).endswith("scratch 30.0 s / 2 epochs vs fine-tuned 10.0 s / 1 epoch: 3.0x slower")


def test_histories_without_seconds_or_rows_give_a_reason_not_a_number():
    probe = [{"epoch": 0, "val_accuracy": 0.8}]  # finetune.strategy linear_probe: no training loop, no clock
    t = time_to_reach("finetuned", probe, "scratch", SCRATCH)
    assert t["speedup"] is None and "finetuned's training history has no" in t["reason"]
    assert time_to_reach("finetuned", [], "scratch", SCRATCH)["reason"] == "no training history for finetuned (empty)"
    assert time_to_reach("finetuned", FINETUNED, "scratch", None)["reason"] == "no training history for scratch"
    # 0.00 s to the bar (a run faster than the history's 0.01 s): the times stand, the ratio does not
    fast = time_to_reach("finetuned", history((1, 0.9, 0.0)), "scratch", SCRATCH)
    assert fast["finetuned"] == {"epoch": 1, "seconds": 0.0} and fast["speedup"] is None and fast["reason"] is None


def test_time_to_accuracy_reads_the_history_files_and_a_missing_or_empty_one_is_a_reason(tmp_path):
    write_history(tmp_path / "finetuned.csv", FINETUNED)
    write_history(tmp_path / "scratch.csv", SCRATCH)
    both = time_to_accuracy({"finetuned": tmp_path / "finetuned.csv", "scratch": tmp_path / "scratch.csv"})
    assert both == {"scratch_best": time_to_reach("finetuned", FINETUNED, "scratch", SCRATCH),
                    "finetuned_best": time_to_reach("scratch", SCRATCH, "finetuned", FINETUNED)}
    missing = time_to_accuracy({"finetuned": tmp_path / "finetuned.csv", "scratch": tmp_path / "absent.csv"})
    assert [t["reason"] for t in missing.values()] == ["no training history for scratch"] * 2
    (tmp_path / "empty.csv").write_text("")
    empty = time_to_accuracy({"finetuned": tmp_path / "empty.csv", "scratch": tmp_path / "scratch.csv"})
    assert empty["scratch_best"]["reason"] == "no training history for finetuned (empty)"
    assert empty["finetuned_best"]["reason"] == "no training history for finetuned (empty)"


def tiny_run(tmp_path, n_classes: int = 3, n_test: int = 30):
    """A prepared test split and the four checkpoints as the earlier stages leave them, with tiny linear models."""
    pre = zoo.preprocessing(zoo.PIXEL_LINEAR, 8)
    classes = [f"c{i}" for i in range(n_classes)]
    rng = np.random.default_rng(0)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    save_split(prepared, "test", Split(rng.integers(0, 255, (n_test, 8, 8), dtype=np.uint8),
                                       np.arange(n_test, dtype=np.int64) % n_classes))
    write_json(prepared / "manifest.json", {"classes": classes, "test_sha256": "t" * 64})
    torch.manual_seed(0)
    for path in ("finetuned", "baselines/scratch", "baselines/linear_probe", "baselines/floor"):
        meta = {"kind": path, "architecture": zoo.PIXEL_LINEAR, "init": "random", "classes": classes,
                "preprocessing": pre, "train": {"best_val_accuracy": 0.5}}
        checkpoint.save_checkpoint(tmp_path / path, zoo.build(zoo.PIXEL_LINEAR, n_classes, pre), meta)
    return prepared


def test_the_evaluate_stage_writes_time_to_accuracy_and_survives_a_missing_history(tmp_path):
    prepared = tiny_run(tmp_path)
    write_history(tmp_path / "finetune_history.csv", FINETUNED)
    write_history(tmp_path / "scratch_history.csv", SCRATCH)
    p = EvaluateParams(n_bootstrap=100, drift_examples=0)

    def evaluate_with(scratch_history):
        out = tmp_path / "evaluate.json"
        report = evaluate.run(prepared, tmp_path / "finetuned", tmp_path / "baselines", out, tmp_path / "plots", p,
                              histories={"finetuned": tmp_path / "finetune_history.csv", "scratch": scratch_history})
        assert json.loads(out.read_text())["time_to_accuracy"] == report["time_to_accuracy"]
        return report["time_to_accuracy"]

    t = evaluate_with(tmp_path / "scratch_history.csv")
    assert t["scratch_best"]["finetuned"] == {"epoch": 3, "seconds": 30.0} and t["scratch_best"]["speedup"] == 1.6
    assert t["finetuned_best"]["scratch"] is None and t["finetuned_best"]["reason"].startswith("scratch never reached")
    # a run where the scratch history is absent: evaluated all the same, the times null with the reason
    t = evaluate_with(tmp_path / "no_scratch_history.csv")
    assert t["scratch_best"]["speedup"] is None and t["scratch_best"]["reason"] == "no training history for scratch"


def test_seeds_that_disagree_make_the_comparison_inconclusive_though_seed_0_alone_wins():
    rng = np.random.default_rng(0)
    b = rng.random(2000) < 0.7
    a0 = b | (rng.random(2000) < 0.3)  # seed 0: well ahead of b
    a1 = b & (rng.random(2000) < 0.97)  # seed 1: a little behind
    p = EvaluateParams(n_bootstrap=300, seeds=2)
    assert evaluate.compare([a0], [b], p)["verdict"] == "positive"
    c = evaluate.compare([a0, a1], [b, b], p)
    assert c["verdict"] == "inconclusive" and c["seeds_disagree"]
    assert c["seed_gains"][0] > 0 > c["seed_gains"][1]
    assert c["gain"] == pytest.approx(np.mean(c["seed_gains"]), abs=1e-6)
    report = {"best": "finetuned", "best_alternative": "scratch", "vs": {"scratch": c}, "verdict": c["verdict"],
              "seeds": 2}
    assert "seeds disagree on the sign" in evaluate.answer(report) and "over 2 training seeds" in evaluate.answer(report)


def test_the_evaluate_stage_rests_on_every_seed_and_names_the_missing_one(tmp_path):
    """Seed 1's fine-tuned and scratch logits (what stages/replicate.py writes) join seed 0's; the probe and
    the floor, which have no seed, stand for every seed with their one fit. A seed that is asked for but
    missing is refused, naming the stage that makes it."""
    from stages.predict import write_logits

    prepared = tiny_run(tmp_path)  # 30 test examples of 3 classes, in turn
    y = np.arange(30) % 3
    right = np.eye(3, dtype=np.float32)[y] * 5  # logits that get every test example right
    write_logits(tmp_path / "replicates" / "1" / "test_logits.npz",
                 {"finetuned": right, "scratch": np.roll(right, 1, axis=1)}, "t" * 64)  # scratch: all wrong

    def evaluate_with(seeds):
        return evaluate.run(prepared, tmp_path / "finetuned", tmp_path / "baselines", tmp_path / "evaluate.json",
                            tmp_path / "plots", EvaluateParams(n_bootstrap=100, drift_examples=0, seeds=seeds),
                            replicates=tmp_path / "replicates")

    report = evaluate_with(2)
    assert report["seeds"] == 2
    assert report["finetuned"]["seed_accuracies"][1] == 1.0 and report["scratch"]["seed_accuracies"][1] == 0.0
    probe = report["linear_probe"]["seed_accuracies"]
    assert probe[0] == probe[1] == report["linear_probe"]["accuracy"]
    assert len(report["vs"]["scratch"]["seed_gains"]) == 2
    assert report["vs"]["scratch"]["gain"] == pytest.approx(np.mean(report["vs"]["scratch"]["seed_gains"]), abs=1e-6)
    assert "seed_gains" not in evaluate_with(1)["vs"]["scratch"]
    with pytest.raises(ValueError, match=r"replicate@2"):
        evaluate_with(3)
