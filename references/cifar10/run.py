"""The CIFAR-10 study: accuracy parity, implicit sparsity, pruning with no loss, deployment, the fair test.

Every step of the study is declared in study.py (inputs, outputs, the ``selecsls`` command or
function) and run by graph.py only when its outputs are missing or out of date, so the study
resumes where it stopped: re-run the same command after an interruption (training continues from
its run folder's last.pt). A step whose inputs another process is still making is reported as
pending (exit status 3) with the command that makes them; nothing waits::

    # once: CIFAR-10 as JPEGs in /data/cifar10/{train,val}/<class>/ (50k / 10k images)
    nohup python3 references/cifar10/run.py --data /data/cifar10 --out runs --preset full > study.log 2>&1 &
    python3 references/cifar10/run.py --data /data/cifar10 --out runs --preset full --report docs/cifar10-full.json

``--report`` collects every finished step into one JSON (merged into the file it updates: results
of run folders no longer here are kept), the plots beside it, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from graph import StepFailed, execute, report_pending  # noqa: E402
from presets import PRESETS, RUN_LISTS, Preset  # noqa: E402
from steps import Study  # noqa: E402

#: Each run list's phases (``--steps``), in the order they run.
PHASES = {
    "cpu": ("train", "prune", "deploy"),
    "full": ("train", "prune", "publish", "headtohead", "fairtest"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 as JPEGs: DIR/{train,val}/<class>/*.jpg")
    parser.add_argument("--out", default="runs/cifar10_study", type=Path, help="the study's runs go to OUT/PRESET")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument(
        "--steps",
        help="comma-separated phases (default: all of them, in order): "
        + "; ".join(f"{runs} presets: {','.join(names)}" for runs, names in PHASES.items()),
    )
    parser.add_argument(
        "--runs",
        help="comma-separated run names: only the steps of these runs (training one per process, say), "
        "and of the pruning and head-to-head steps those whose sources these runs are",
    )
    parser.add_argument("--report", type=Path, metavar="JSON", help="only collect the finished steps into JSON + plots")
    parser.add_argument(
        "--publish-to",
        type=Path,
        default=HERE.parents[1],
        metavar="DIR",
        help="where the publish step puts the pruned model and its example images (default: the repository)",
    )
    args = parser.parse_args(argv)
    if not Path(args.data, "train").is_dir():
        parser.error(
            f"{args.data}/train does not exist: unpack CIFAR-10 as DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg"
        )
    preset = PRESETS[args.preset]
    runs = RUN_LISTS[preset.runs]
    names = args.runs.split(",") if args.runs else [spec.name for spec in runs]
    unknown = sorted(set(names) - {spec.name for spec in runs})
    if unknown:
        parser.error(f"unknown run(s) {unknown} in --runs; the {args.preset} preset has {[s.name for s in runs]}")
    known = PHASES[preset.runs]
    phases = args.steps.split(",") if args.steps else list(known)
    if set(phases) - set(known):
        parser.error(
            f"unknown step(s) {sorted(set(phases) - set(known))} in --steps; the {args.preset} preset has {known}"
        )
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    study = Study(str(args.data), args.out / args.preset, preset, runs)
    _check_preset(study.out, preset)

    import report
    import study as declared

    if args.report:
        report.report(study, args.report)
        return 0
    graph = declared.graph(study, args.publish_to)
    selected = [
        step
        for step in graph
        if step.phase in phases and (not args.runs or not step.runs or set(step.runs) & set(names))
    ]
    try:
        return report_pending(execute(selected, graph=graph))
    except StepFailed as failure:
        print(f"failed: {failure}", file=sys.stderr)
        return 1


def _check_preset(out: Path, preset: Preset) -> None:
    """Runs of other settings in ``out`` must not be resumed or reported as this preset's."""
    import selecsls

    record = out / "preset.json"
    current = json.loads(json.dumps(preset.__dict__))
    if record.exists():
        defaults = {item.name: item.default for item in fields(Preset) if item.default is not MISSING}
        recorded = {**json.loads(json.dumps(defaults)), **json.loads(record.read_text())}  # fields added since
        if recorded != current:
            sys.exit(f"{out} holds runs made with other settings ({record.read_text().strip()}); pass another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    with selecsls.atomic_write(record, "w") as handle:
        handle.write(json.dumps(current) + "\n")


if __name__ == "__main__":
    sys.exit(main())
