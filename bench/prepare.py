"""How prepare scales with a team's own photos: for 5,000 / 20,000 / 50,000 JPEG images of 256 px in an
ImageFolder (10 classes), `python -m stages.prepare` timed end to end (images per second over the whole
stage: listing, decoding, drawing, leakage checks, writing) with its peak RSS, then the peak RSS of one
fine-tuning epoch on what it prepared. Issue 24's targets: peak RSS within 1.5x between 5k and 50k images,
and >= 300 images/s on 2 cores at 256 px.

The images are generated once into --cache (about 14 KB each; reused by later runs): smooth random
shapes, a colour per class, JPEG quality 90. Prepare stores them at prepare.image_size (params.yaml) and,
with no test split of their own, keeps every image not drawn for train/val as the test set: what a team's
folder of photos gives it. Run nothing else meanwhile: the rates are the measurement.

Run:  .venv/bin/python bench/prepare.py                       # 5k, 20k, 50k (~15 min, ~1 GB of images)
      .venv/bin/python bench/prepare.py --sizes 2000 --no-epoch
Prints a table and writes bench/results/prepare.json."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 10
SIDE = 256


def _write_images(job: tuple[Path, int, int, int]) -> int:
    from PIL import Image, ImageDraw, ImageFilter

    folder, label, start, count = job
    rng = np.random.default_rng([label, start])
    hue = np.array([(label * 37) % 256, (label * 91) % 256, (label * 151) % 256])
    for i in range(start, start + count):
        im = Image.new("RGB", (SIDE, SIDE), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            box = sorted(rng.integers(0, SIDE, 2)), sorted(rng.integers(0, SIDE, 2))
            colour = np.clip(hue + rng.normal(0, 40, 3), 0, 255).astype(int)
            draw.ellipse([box[0][0], box[1][0], box[0][1], box[1][1]], fill=tuple(int(c) for c in colour))
        im.filter(ImageFilter.GaussianBlur(2)).save(folder / f"{i:06d}.jpg", quality=90)
    return count


def images(cache: Path, n: int) -> Path:
    """An ImageFolder of n JPEGs (n/10 per class) under cache, generated on first use."""
    root = cache / f"{n}"
    done = root / ".complete"
    if done.exists():
        return root
    per = n // CLASSES
    jobs = []
    for c in range(CLASSES):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        jobs += [(root / f"class_{c}", c, s, min(500, per - s)) for s in range(0, per, 500)]
    start = time.perf_counter()
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        made = sum(pool.map(_write_images, jobs))
    print(f"  generated {made} images of {SIDE} px in {time.perf_counter() - start:.0f} s", flush=True)
    done.touch()
    return root


def timed(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in MB): GNU time's maximum resident set of the command (or of a process it
    waited for, e.g. a decoding worker, whichever was largest)."""
    start = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return wall, int(res.stderr.strip().splitlines()[-1]) // 1024


def measure(n: int, cache: Path, epoch: bool) -> dict:
    source = images(cache, n)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="headstart-prepare-bench-") as tmp:
        out = Path(tmp)
        params["prepare"].update(dataset="image-folder")
        params["paths"].update(source=str(source), prepared=str(out / "prepared"), quarantine=str(out / "q.json"),
                               finetuned=str(out / "finetuned"), finetune_history=str(out / "history.csv"),
                               checkpoints=str(out / "checkpoints"))
        params["finetune"].update(epochs=1)
        (out / "params.yaml").write_text(yaml.safe_dump(params))
        arg = ["--params", str(out / "params.yaml")]
        wall, rss = timed([sys.executable, "-m", "stages.prepare", *arg])
        row = {"images": n, "prepare_s": round(wall, 1), "images_per_s": round(n / wall, 1), "prepare_peak_rss_mb": rss,
               "prepared_mb": round(sum(f.stat().st_size for f in (out / "prepared").iterdir()) / 1e6, 1)}
        print(f"  {n} images: prepare {wall:.1f} s ({n / wall:.0f} images/s), peak RSS {rss} MB", flush=True)
        if epoch:
            wall, rss = timed([sys.executable, "-m", "stages.finetune", *arg])
            row.update(epoch_s=round(wall, 1), epoch_peak_rss_mb=rss)
            print(f"  {n} images: one fine-tuning epoch {wall:.1f} s, peak RSS {rss} MB", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "headstart-prepare-bench-images")
    ap.add_argument("--no-epoch", dest="epoch", action="store_false", help="skip the fine-tuning epoch")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prepare.json")
    args = ap.parse_args(argv)
    rows = [measure(n, args.cache, args.epoch) for n in args.sizes]
    print(f"{'images':>8}{'prepare s':>11}{'images/s':>10}{'prepare RSS MB':>16}{'epoch s':>9}{'epoch RSS MB':>14}")
    for r in rows:
        print(f"{r['images']:>8}{r['prepare_s']:>11}{r['images_per_s']:>10}{r['prepare_peak_rss_mb']:>16}"
              f"{r.get('epoch_s', '-'):>9}{r.get('epoch_peak_rss_mb', '-'):>14}")
    small, big = rows[0], rows[-1]
    growth = {k: round(big[k] / small[k], 2) for k in ("prepare_peak_rss_mb", "epoch_peak_rss_mb") if k in small}
    print("peak RSS, largest / smallest: " + ", ".join(f"{k} {v}x" for k, v in growth.items()) + " (target <= 1.5x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"measured": time.strftime("%Y-%m-%d"), "cpus": len(os.sched_getaffinity(0)),
                                    "side_px": SIDE, "image_size": yaml.safe_load((ROOT / "params.yaml").read_text())
                                    ["prepare"]["image_size"], "rows": rows, "rss_growth": growth}, indent=2) + "\n")


if __name__ == "__main__":
    main()
