"""Promote a registered version to `champion` (or another alias), as a person would in the MLflow UI, but
checked: the version's promotion gate (tags gate.<check>.passed, written by the register stage) must
have passed, or the promotion must be forced with a reason, which is recorded on the version.

Run:  python -m flows.promote 3                          # version 3 of params.yaml's task's model: champion
      python -m flows.promote 3 --task text              # of another task's registered model
      python -m flows.promote 3 --model headstart-my-photos
      python -m flows.promote 3 --force --reason "..."   # despite a failed gate; the reason is kept
      python -m flows.promote 2                          # rollback: point champion back at version 2
Exit status 1 and the failing checks when refused."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from prefect import flow, get_run_logger

from stages.params import Params
from stages.promotion import PromotionRefused, promote_version
from stages.registry import CHAMPION, Store


@flow(name="headstart-promote", log_prints=True)
def promote(version: int, alias: str = CHAMPION, force: bool = False, reason: str = "",
            params_file: str = "params.yaml", by: str = "", model_name: str = "") -> dict:
    params = Params.load(Path(params_file))
    store = Store(params.paths.mlflow_db, params.paths.mlflow_artifacts)
    done = promote_version(store, model_name or params.register.model_name, version, alias, force, reason,
                           by or "prefect")
    get_run_logger().info("%s", done)
    return done


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("version", type=int, help="the model version to promote")
    ap.add_argument("--alias", default=CHAMPION, help="alias to set (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="promote even if the version's gate failed (needs --reason)")
    ap.add_argument("--reason", default="", help="why: required with --force, recorded as a tag")
    ap.add_argument("--params", default="params.yaml")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--task", help="the task whose registered model this is (default: params.yaml's)")
    which.add_argument("--model", help="the registered model's name")
    args = ap.parse_args(argv)
    try:
        from flows.tasks import registered_name

        name = args.model or (registered_name(args.task) if args.task else "")
        done = promote(args.version, args.alias, args.force, args.reason, args.params, by=getpass.getuser(),
                       model_name=name)
    except (PromotionRefused, LookupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    moved = f" (was version {done['previous']})" if done["previous"] else ""
    print(f"{done['model_name']}@{done['alias']} -> version {done['version']}{moved}"
          + (f", forced: {done['reason']}" if done["forced"] else ""))


if __name__ == "__main__":
    main()
