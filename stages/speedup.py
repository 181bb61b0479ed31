"""Time to accuracy: how much sooner one model reaches another's best validation accuracy than that model
itself does, from their training histories (stages/train.py: write_history; one row per epoch with
`epoch`, `val_accuracy` and cumulative `seconds`). evaluate measures it for the run (fine-tuned vs
scratch, both ways), the run summary and the model card say it in a line, and the curves measure it at
every label budget."""

from __future__ import annotations

import csv
from pathlib import Path


def time_to_reach(model: str, rows: list[dict[str, float]] | None, target: str,
                  target_rows: list[dict[str, float]] | None) -> dict:
    """How much sooner `model` reaches `target`'s best validation accuracy than `target` itself does, from
    the two training histories (write_history's rows; None: no history). The bar, `val_accuracy`, is the
    highest val_accuracy in `target`'s history. Each model's time to it (under its name: `epoch`, `seconds`)
    is its first epoch whose val_accuracy >= the bar (for `target`, the first epoch at its best; a tie with
    the bar counts as reached) and that row's `seconds`: cumulative wall seconds since its training began
    (training and validation epochs; not loading, nor an lp_ft probe). `speedup` = target's seconds / model's
    seconds, `epoch_speedup` the same in epochs: above 1, `model` got there faster. Histories of different
    lengths are compared as they are. When a history is missing, empty or has no seconds, or `model` never
    reaches the bar, what cannot be measured is None and `reason` says why (else None)."""
    out: dict = {"model": model, "target": target, "val_accuracy": None, model: None, target: None,
                 "speedup": None, "epoch_speedup": None, "reason": None}
    for name, h in ((target, target_rows), (model, rows)):
        if not h:
            return {**out, "reason": f"no training history for {name}" + (" (empty)" if h == [] else "")}
        if not all({"epoch", "val_accuracy", "seconds"} <= set(r) for r in h):
            return {**out, "reason": f"{name}'s training history has no epoch, val_accuracy or seconds column"}
    bar = max(r["val_accuracy"] for r in target_rows)

    def first(h: list[dict[str, float]]) -> dict | None:
        hit = next((r for r in h if r["val_accuracy"] >= bar), None)
        return None if hit is None else {"epoch": int(hit["epoch"]), "seconds": hit["seconds"]}

    def ratio(theirs: float, ours: float) -> float | None:
        return round(theirs / ours, 3) if ours > 0 else None  # 0: faster than the 0.01 s the history keeps

    theirs, ours = first(target_rows), first(rows)
    out.update({"val_accuracy": bar, target: theirs, model: ours})
    if ours is None:
        last = rows[-1]
        best = max(r["val_accuracy"] for r in rows)
        return {**out, "reason": f"{model} never reached {bar:.4f}: its own best was {best:.4f} in "
                                 f"{int(last['epoch'])} epochs, {last['seconds']:.1f} s"}
    return {**out, "speedup": ratio(theirs["seconds"], ours["seconds"]),
            "epoch_speedup": ratio(theirs["epoch"], ours["epoch"])}


def time_to_accuracy(histories: dict[str, Path]) -> dict:
    """time_to_reach both ways from the history files (`histories`: model name to CSV; a missing file is a
    missing history): fine-tuned to scratch's best (`scratch_best`) and scratch to fine-tuned's best
    (`finetuned_best`)."""
    rows = {m: read_history(histories.get(m)) for m in ("finetuned", "scratch")}
    return {"scratch_best": time_to_reach("finetuned", rows["finetuned"], "scratch", rows["scratch"]),
            "finetuned_best": time_to_reach("scratch", rows["scratch"], "finetuned", rows["finetuned"])}


def read_history(path: Path | None) -> list[dict[str, float]] | None:
    """A training history (stages/train.py: write_history) as numbers, one dict per epoch; None when there is
    no such file (its stage has not run)."""
    if path is None or not Path(path).exists():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return [{k: float(v) for k, v in r.items() if k and v} for r in rows]
    except ValueError as e:
        raise ValueError(f"{path}: not a training history ({e}); rerun the stage that writes it") from None


def describe_time(t: dict) -> str:
    """One time_to_reach result in a line, e.g. "time to scratch's best (val 0.78): fine-tuned 41.9 s /
    3 epochs vs scratch 120.3 s / 9 epochs: 2.9x faster"."""
    said = {"finetuned": "fine-tuned"}
    model, target = t["model"], t["target"]
    head = f"time to {said.get(target, target)}'s best"
    if t["val_accuracy"] is not None:
        head += f" (val {t['val_accuracy']:.2f})"
    if t["reason"] is not None:
        return f"{head}: {t['reason']}"

    def took(name: str) -> str:
        e = t[name]["epoch"]
        return f"{said.get(name, name)} {t[name]['seconds']:.1f} s / {e} epoch{'' if e == 1 else 's'}"

    line = f"{head}: {took(model)} vs {took(target)}"
    x = t["speedup"]
    if x is None:
        return line
    return f"{line}: {x:.1f}x faster" if x >= 1 else f"{line}: {1 / x:.1f}x slower"


def time_lines(times: dict) -> list[str]:
    """What a person reads of time_to_accuracy (`times`; {} from an evaluation made before it was measured):
    fine-tuned to scratch's best, and the reverse only when scratch got to fine-tuning's best too."""
    return [describe_time(t) for key, t in times.items() if key == "scratch_best" or t["reason"] is None]
