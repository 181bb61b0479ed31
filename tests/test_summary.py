"""The run summary (flows/summary.py) from a hand-made evaluate.json: what it prints and what summary.json holds."""

import json

from flows.summary import summary
from stages.speedup import time_to_reach
from stages.files import write_json
from stages.params import Params

from .conftest import tiny_params
from .test_evaluate import FINETUNED, SCRATCH, history

MODELS = ("finetuned", "scratch", "linear_probe", "floor")


def evaluation(times: dict | None) -> dict:
    """evaluate.json's shape: fine-tuned 0.85, each alternative lower, a positive verdict, and `times` as
    time_to_accuracy (None: an evaluation made before it was measured)."""
    ev = {m: {"accuracy": a, "accuracy_ci95": [a - 0.02, a + 0.02], "val_accuracy": a}
          for m, a in zip(MODELS, (0.85, 0.77, 0.80, 0.70), strict=True)}
    ev["vs"] = {m: {"gain": 0.85 - ev[m]["accuracy"], "gain_ci95": [0.01, 0.1], "mcnemar_p": 0.01, "verdict": "positive"}
                for m in MODELS[1:]}
    ev.update({"best": "finetuned", "best_alternative": "linear_probe", "verdict": "positive",
               "transfer_verdict": "positive", "n_test": 100})
    if times is not None:
        ev["time_to_accuracy"] = times
    return ev


def test_the_summary_says_how_much_sooner_fine_tuning_reached_scratchs_best(tmp_path, tiny_source):
    params = Params.load(tiny_params(tmp_path, tiny_source))
    times = {"scratch_best": time_to_reach("finetuned", FINETUNED, "scratch", SCRATCH),
             "finetuned_best": time_to_reach("scratch", SCRATCH, "finetuned", FINETUNED)}
    write_json(params.paths.evaluate_metrics, evaluation(times))
    lines = summary(params).splitlines()
    assert ("time to scratch's best (val 0.76): fine-tuned 30.0 s / 3 epochs vs scratch 48.0 s / 4 epochs: "
            "1.6x faster") in lines
    assert not any(line.startswith("time to fine-tuned's best") for line in lines)  # scratch never got there
    written = json.loads((params.paths.summaries / params.task / "summary.json").read_text())
    assert written["time_to_accuracy"] == times

    # equal bests: scratch reaches fine-tuning's best too, and that is said as well
    finetuned, scratch = history((1, 0.8, 10.0)), history((1, 0.5, 10.0), (2, 0.8, 30.0))
    times = {"scratch_best": time_to_reach("finetuned", finetuned, "scratch", scratch),
             "finetuned_best": time_to_reach("scratch", scratch, "finetuned", finetuned)}
    write_json(params.paths.evaluate_metrics, evaluation(times))
    lines = summary(params).splitlines()
    assert "time to fine-tuned's best (val 0.80): scratch 30.0 s / 2 epochs vs fine-tuned 10.0 s / 1 epoch: " \
           "3.0x slower" in lines


def test_an_evaluation_from_before_time_to_accuracy_still_summarises(tmp_path, tiny_source):
    params = Params.load(tiny_params(tmp_path, tiny_source))
    write_json(params.paths.evaluate_metrics, evaluation(None))
    assert "time to" not in summary(params)
    assert json.loads((params.paths.summaries / params.task / "summary.json").read_text())["time_to_accuracy"] is None
