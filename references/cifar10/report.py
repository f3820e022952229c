"""The study's report: every finished step collected into one JSON, its plots and tables.

Results come from the JSON files the steps wrote (``selecsls eval --json-out``, ``bench``'s JSON,
the runs' metrics.jsonl, the fair test's records). The report merges into the JSON it updates: an
entry whose files are no longer under ``--out`` (a run folder of an earlier session) is kept as the
earlier report recorded it, so no study result is lost when run folders are.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import fair_test
import head_to_head
import torch
from presets import FAIR_TEST_CELLS, PUBLISHED_CHECK_IMAGES, PUBLISHED_MODEL, THRESHOLD, Preset
from steps import Study, write_json

import selecsls


def sparsity_measures(run_dir: Path, data: str, preset: Preset, images: int = 500) -> dict:
    """How much of the run's best model is off, by the numbers: channels with |gamma| < 1e-3; channels
    zero after ReLU on every one of ``images`` balanced val images (activation-measured); and what
    exact pruning at 1e-3 would keep of the MACs, with the output change it causes. Cached in the run."""
    cached = run_dir / "sparsity_measures.json"
    if not cached.exists():
        from selecsls.data.batching import TransformedDataset, balanced_subset, build_loader
        from selecsls.data.transforms import eval_transform_for
        from selecsls.train.evaluation import validation_data

        model = selecsls.load(run_dir / "best.pt").eval()
        dataset = validation_data(data, model)
        subset = balanced_subset(dataset.targets, images, 0)
        loader = build_loader(TransformedDataset(dataset, eval_transform_for(model.card.preprocessing)), subset, 100, 0)
        analysis = selecsls.analyze_sparsity(model, THRESHOLD, loader)
        pruned = selecsls.prune(model, THRESHOLD, max_output_change=None)
        size = (1, 3, preset.img_size, preset.img_size)
        result = dict(
            channels=analysis.total_channels,
            gamma_below_1e_3=sum(int(layer.low_scale.sum()) for layer in analysis.layers),
            dead_on_val=sum(int(layer.dead.sum()) for layer in analysis.layers),
            val_images=min(images, len(subset)),
            pruned_macs_fraction=selecsls.count_macs(pruned, size) / selecsls.count_macs(model, size),
            pruned_output_change=pruned.output_change,
        )
        write_json(result, cached)
    return json.loads(cached.read_text())


def _runs(study: Study, figures: Path) -> dict:
    """Each run with records under ``out``: its epochs, best top-1, speed, wall time, sparsity."""
    out, preset, runs = study.out, study.preset, {}
    for spec in study.runs:
        history = study.history(spec.name)
        finished = (out / spec.name / "summary.json").exists()
        if not history or not (finished or preset.pilot_epochs):  # the full budget reports runs in progress
            continue
        wall = out / spec.name / "wall_seconds.txt"
        runs[spec.name] = dict(
            model=spec.model,
            recipe=spec.recipe,
            settings=list(spec.extra),
            question=spec.question,
            finished=finished,
            epochs=[{key: value for key, value in record.items() if key != "gamma_histogram"} for record in history],
            best_top1=max(record["val_top1"] for record in history),
            images_per_s=sorted(record["train_images_per_s"] for record in history)[len(history) // 2],
            wall_seconds=sum(float(line) for line in wall.read_text().split()) if wall.exists() else None,
        )
        if spec.model.startswith("selecsls") and finished:
            runs[spec.name]["sparsity"] = sparsity_measures(out / spec.name, study.data, preset)
        histograms = out / spec.name / "gamma_histograms.png"
        if spec.question == "sparsity" and histograms.exists():
            shutil.copyfile(histograms, figures / f"gamma-{spec.name}.png")
    return runs


def report(study: Study, destination: Path) -> None:
    """Collect every finished step into ``destination`` (JSON) and plots beside it; print the tables."""
    out, preset = study.out, study.preset
    figures = destination.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(destination.read_text()) if destination.exists() else {}
    current = _json(preset.__dict__)
    if any(current.get(key) != value for key, value in earlier.get("preset", {}).items()):
        raise SystemExit(f"{destination} reports another preset ({earlier['preset']}): pass another --report")
    evaluations = {
        str(path.relative_to(out)).removesuffix(".eval.json"): json.loads(path.read_text())
        for path in sorted(out.rglob("*.eval.json"))
    }
    latency = {
        path.stem.removeprefix("latency-"): json.loads(path.read_text()) for path in sorted(out.glob("latency-*.json"))
    }
    source, pilots = out / "prune_source.txt", out / "pilots.json"
    found = dict(
        preset=current,
        runs=_runs(study, figures),
        pilots=json.loads(pilots.read_text()) if pilots.exists() else {},
        prune_source=source.read_text().strip() if source.exists() else None,
        evaluations=evaluations,
        latency=latency,
        pruned_vs_resnet50=pruned_vs_resnet50(out, "bench-pruned-vs-resnet50.json"),
        head_to_head=head_to_head.collect(out, "head-to-head"),
        head_to_head_sparse=head_to_head.collect(out, "head-to-head-sparse"),
    )
    timed = ("latency", "pruned_vs_resnet50", "head_to_head", "head_to_head_sparse")
    found["cpu"] = _cpu() if any(found[key] for key in timed) else None  # the machine of the timings kept
    if "published" in evaluations:  # the committed model: where it is, its latency (the pruned network's), its checks
        examples = out / "published-examples.json"
        evaluations["published"] |= dict(
            model_file=str(PUBLISHED_MODEL),
            latency=[row for row in found["pruned_vs_resnet50"] if row["model"] in ("pruned-1e-3.pt", "resnet50")],
            balanced_subset=evaluations.pop(f"published.limit-{PUBLISHED_CHECK_IMAGES}", None),
            example_predictions=json.loads(examples.read_text()) if examples.exists() else None,
        )
    result = _merged(earlier, found)
    result["fair_test"] = fair_test_section(study, result)
    write_json(result, destination)
    if study.preset.runs == "full":
        fair_test.removal_figure(result["fair_test"]["rows"], figures / "fair-test-removal.png")
    _plot(result["runs"], figures)
    if found["head_to_head"] or found["head_to_head_sparse"]:  # both sources in one plot
        sparse = [row | dict(family=f"{row['family']} (sparse-source bench)") for row in result["head_to_head_sparse"]]
        _plot_pareto(result["head_to_head"] + sparse, figures / "pareto.png")
    _print_tables(result)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _json(value):
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _merged(earlier: dict, found: dict) -> dict:
    """``found`` over ``earlier``: dict sections merged key by key (what ``out`` holds wins), other
    sections replaced where ``out`` holds them (a non-empty value)."""
    result = dict(earlier)
    for key, value in found.items():
        if isinstance(value, dict) and isinstance(earlier.get(key), dict) and key != "preset":
            result[key] = {**earlier[key], **value}
        elif value or key not in earlier:
            result[key] = value
    return result


def fair_test_section(study: Study, result: dict) -> dict:
    """Issue 28's table: one row per (model, recipe) with top-1, channels, |gamma| < 1e-3, removable
    channels, MACs and top-1 after, the output change; measured where the fair test ran, derived where
    its run's records settle it (no inactive channel: nothing to remove), else pending with the commands."""
    folder, rows = study.out / fair_test.FOLDER, []
    earlier = {(row["model"], row["recipe"]): row for row in result.get("fair_test", {}).get("rows", [])}
    for (model, recipe), source in FAIR_TEST_CELLS.items():
        cell = f"{model}-{recipe}"
        record = folder / f"{cell}.json"
        if record.exists():
            row = json.loads(record.read_text())
            row |= dict(
                status="measured",
                top1=_top1(folder / f"{cell}.source.eval.json"),
                top1_after=_top1(folder / f"{cell}.eval.json"),
            )
            if row["stand_in"]:
                row |= _stand_in_facts(result, source, row)
        else:
            kept = earlier.get((model, recipe), {})  # measured or derived by an earlier report: a result
            row = (
                kept
                if kept.get("status", "pending") != "pending"
                else _derived_or_pending(study, result, model, recipe, source)
            )
        rows.append(row)
    return dict(threshold=THRESHOLD, figure="fair-test-removal.png", rows=rows)


def _stand_in_facts(result: dict, source: str, row: dict) -> dict:
    """A stand-in row (measured on the published, already pruned model): the BN facts its source's run
    recorded, and what the measured numbers are relative to."""
    chosen = result.get("pilots", {}).get(source, {}).get("chosen", source)
    recorded = result.get("runs", {}).get(chosen, {})
    first = recorded.get("sparsity", {}).get("pruned_output_change")
    facts = dict(
        run=chosen,
        gamma_below_1e_3_reconstructed=row["gamma_below_1e_3"],
        note=f"{chosen}'s checkpoint is gone: measured on the published model ({row['source']}), the source "
        f"pruned exactly at |gamma| < {THRESHOLD:g} (output change {first}) and since re-pruned as recorded under "
        "evaluations.published.pruned_from; output_change is relative to that model. Per stage, inactive = the "
        "channels those prunings removed + those whose fused filter norm is below the threshold (a fused model has "
        "no BN); gamma_below_1e_3 is the run's record",
    )
    if "sparsity" in recorded:
        facts["gamma_below_1e_3"] = recorded["sparsity"]["gamma_below_1e_3"]
        facts["top1"] = recorded["best_top1"]
    return facts


def _top1(evaluation: Path) -> float | None:
    return json.loads(evaluation.read_text())["top1"] if evaluation.exists() else None


def _derived_or_pending(study: Study, result: dict, model: str, recipe: str, source: str) -> dict:
    runs = [name for name, run in result.get("runs", {}).items() if (run["model"], run["recipe"]) == (model, recipe)]
    chosen = result.get("pilots", {}).get(source, {}).get("chosen", source)
    run = result.get("runs", {}).get(chosen if chosen in runs else "", None)
    if run and run["finished"]:
        best = max(run["epochs"], key=lambda record: record["val_top1"])
        if best.get("gamma_below_1e-3") == 0.0:  # no channel below the threshold: nothing can be removed
            size = (1, 3, study.preset.img_size, study.preset.img_size)
            dense = selecsls.create_model(model, num_classes=10)
            channels = sum(m.num_features for m in dense.modules() if isinstance(m, torch.nn.BatchNorm2d))
            macs = selecsls.count_macs(dense, size)
            return dict(
                model=model,
                recipe=recipe,
                status="derived",
                run=chosen,
                top1=run["best_top1"],
                channels=channels,
                gamma_below_1e_3=0,
                removable_channels=0,
                macs=macs,
                macs_after=macs,
                top1_after=run["best_top1"],
                output_change=0.0,
                note=f"{chosen}'s best epoch has no |gamma| below {THRESHOLD:g} (smallest {best['gamma_min']:.2g}): "
                "no channel is inactive, so none is removable; its checkpoint is not kept",
            )
    return dict(
        model=model,
        recipe=recipe,
        status="pending",
        resume=[
            study.resume_command("train", ",".join(study.members(source))),
            study.resume_command("fairtest", ",".join(study.members(source))),
        ],
    )


def pruned_vs_resnet50(out: Path, name: str) -> list[dict]:
    """Per model and size (batch 1, one thread): params, MACs, eager (``model(x)``) and fastest fp32
    latency in ms, each as a speed-up over resnet50's eager and fastest; empty until that bench ran."""
    bench_json = out / name
    if not bench_json.exists():
        return []
    from selecsls.bench.runner import size_label

    bench = json.loads(bench_json.read_text())
    eager = {
        (record["model"], record["height"], record["width"]): record["summary"]["median"]
        for record in bench["latency"]
        if record["backend"] == "eager" and record["status"] == "ok"
    }
    best = {
        (row["model"], row["height"], row["width"]): row for row in bench["best_vs_best"] if row["precision"] == "fp32"
    }
    reference = bench["reference"]
    rows = []
    for (model, height, width), row in best.items():
        size = size_label(height, width)
        rows.append(
            dict(
                model=model.removeprefix(f"{out}/"),
                size=size,
                params=bench["models"][model]["params"],
                macs=bench["models"][model]["macs_per_image"][size],
                eager_ms=1e3 * eager[(model, height, width)],
                eager_speedup=eager[(reference, height, width)] / eager[(model, height, width)],
                best_backend=row["backend"],
                best_ms=1e3 * row["median_s"],
                best_speedup=row["speedup"],
            )
        )
    return rows


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return "unknown"


def _plot(runs: dict, folder: Path) -> None:
    """folder/curves.png: val top-1 per epoch (all runs); for runs with BN, the smallest / median |gamma|
    and the fraction of |gamma| below the pruning threshold 1e-3 (sparsity vs epoch)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    accuracy_ax, scale_ax, sparsity_ax = fig.subplots(1, 3)
    for name, run_result in runs.items():
        records = run_result["epochs"]
        epochs = [record["epoch"] for record in records]
        (line,) = accuracy_ax.plot(epochs, [record["val_top1"] for record in records], marker="o", label=name)
        if "gamma_min" not in records[0]:
            continue
        color = line.get_color()
        for key, style in (("gamma_min", "-"), ("gamma_median", "--")):
            values = [record[key] for record in records]
            label = name if key == "gamma_min" else None  # one legend entry per run: the colour
            scale_ax.plot(epochs, values, linestyle=style, marker="o", markersize=3, color=color, label=label)
        below = [100 * record["gamma_below_1e-3"] for record in records]
        sparsity_ax.plot(epochs, below, marker="o", color=color, label=name)
    accuracy_ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="CIFAR-10 validation accuracy")
    scale_ax.axhline(1e-3, color="grey", linewidth=0.8, label="pruning threshold 1e-3")
    scale_ax.set(xlabel="epoch", ylabel="|gamma|", yscale="log", title="BN scales: smallest (solid) and median")
    sparsity_ax.set(xlabel="epoch", ylabel="% of BN channels", title="sparsity: |gamma| < 1e-3")
    for ax in (accuracy_ax, scale_ax, sparsity_ax):
        ax.legend(fontsize=6, loc="lower left" if ax is scale_ax else "best")
    fig.tight_layout()
    with selecsls.atomic_write(folder / "curves.png") as handle:
        fig.savefig(handle, format="png", dpi=90)


def _plot_pareto(rows: list[dict], path: Path) -> None:
    """Top-1 against batch-1 CPU latency on each model's fastest backend, fp32 and int8 side by side:
    one colour per family, hollow markers for dense models, each family's Pareto front drawn."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6))
    for ax, precision in zip(fig.subplots(1, 2), ("fp32", "int8"), strict=True):
        accuracy = "top1" if precision == "fp32" else "int8_top1"
        families = dict.fromkeys(row["family"] for row in rows)
        for family, color in zip(families, ("tab:blue", "tab:red", "tab:orange", "tab:green"), strict=False):
            points = [(row.get(f"{precision}_ms"), row.get(accuracy), row) for row in rows if row["family"] == family]
            points = sorted((p for p in points if None not in p[:2]), key=lambda p: p[:2])  # timed and scored
            for latency, top1, row in points:
                face = "none" if row["name"].endswith(" dense") else color
                ax.scatter(latency, top1, color=color, facecolors=face, zorder=3)
                ax.annotate(
                    row["name"].removeprefix(f"{family.split(' (')[0]} "),
                    (latency, top1),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            front, best = [], float("-inf")
            for latency, top1, _ in points:  # fastest first: a point is on the front if nothing faster beats it
                if top1 > best:
                    front.append((latency, top1))
                    best = top1
            if front:
                ax.plot(*zip(*front, strict=True), color=color, label=family)
        ax.set(
            xlabel=f"batch-1 latency, fastest {precision} backend (ms, 1 thread)",
            ylabel="val top-1 (%)",
            title=f"CIFAR-10 at 32 px: {precision}",
        )
        if ax.get_legend_handles_labels()[0]:  # nothing scored in this precision: no legend
            ax.legend(fontsize=7)
    fig.tight_layout()
    with selecsls.atomic_write(path) as handle:  # a whole PNG or the previous one
        fig.savefig(handle, format="png", dpi=90)


def _print_tables(result: dict) -> None:
    print("| run | model | recipe | settings | best val top-1 | images/s | wall time of segments that ended |")
    print("|---|---|---|---|---|---|---|")
    for name, run_result in result["runs"].items():
        wall = run_result["wall_seconds"]
        print(
            f"| {name} | {run_result['model']} | {run_result['recipe']} | {' '.join(run_result['settings']) or '-'} | "
            f"{run_result['best_top1']:.1f}% | {run_result['images_per_s']:.1f} | "
            f"{'-' if wall is None else f'{wall / 60:.1f} min'} |"
        )
    print("\n| run | epoch | val top-1 | |gamma|<1e-3 | |gamma|<1e-2 | min |gamma| | median |gamma| |")
    print("|---|---|---|---|---|---|---|")
    for name, run_result in result["runs"].items():
        for record in run_result["epochs"]:
            if "gamma_min" in record:
                below = [f"{100 * record[f'gamma_below_{t}']:.2f}%" for t in ("1e-3", "1e-2")]
                print(
                    f"| {name} | {record['epoch']} | {record['val_top1']:.1f}% | {below[0]} | {below[1]} "
                    f"| {record['gamma_min']:.2e} | {record['gamma_median']:.3f} |"
                )
    print(
        "\n| run | best val top-1 | channels | |gamma| < 1e-3 | zero after ReLU on 500 val images "
        "| MACs left by exact pruning at 1e-3 | its output change |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, run_result in result["runs"].items():
        if "sparsity" in run_result:
            measures = run_result["sparsity"]
            print(
                f"| {name} | {run_result['best_top1']:.1f}% | {measures['channels']} | "
                f"{measures['gamma_below_1e_3']} | {measures['dead_on_val']} | "
                f"{100 * measures['pruned_macs_fraction']:.1f}% | "
                f"{measures['pruned_output_change']:.1e} |"
            )
    print("\n| model file | val top-1 | images |")
    print("|---|---|---|")
    for name, evaluation in result["evaluations"].items():
        print(f"| {name} | {evaluation['top1']:.2f}% | {evaluation['images']} |")
    print("\n| pruned @ size | params dense -> pruned | GMACs | dense ms | BN folded ms | pruned ms | pruned/folded |")
    print("|---|---|---|---|---|---|---|")
    for name, figures in result["latency"].items():
        dense, fused, pruned = (figures["models"][key] for key in ("dense", "fused", "pruned"))
        print(
            f"| {name} | {dense['params']:,} -> {pruned['params']:,} | {dense['gmacs']:.4g} -> {pruned['gmacs']:.4g} | "
            f"{dense['median_ms']:.2f} | {fused['median_ms']:.2f} | {pruned['median_ms']:.2f} | "
            f"{pruned['median_ms'] / fused['median_ms']:.2f}x |"
        )
    print(
        "\n| model | size | params | MMACs | eager ms | vs resnet50 eager | fastest fp32 | ms | vs resnet50's fastest |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in result["pruned_vs_resnet50"]:
        print(
            f"| {row['model']} | {row['size']} | {row['params']:,} | {row['macs'] / 1e6:.1f} | {row['eager_ms']:.2f} | "
            f"{row['eager_speedup']:.2f}x | {row['best_backend']} | {row['best_ms']:.2f} | {row['best_speedup']:.2f}x |"
        )
    print("\n| model | MMACs | params | top-1 pruned | top-1 | int8 top-1 | fastest fp32 | ms | fastest int8 | ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in result["head_to_head"] + result.get("head_to_head_sparse", []):
        top1 = [_percent(row.get(key)) for key in ("top1_after_pruning", "top1", "int8_top1")]
        print(
            f"| {row['name']} | {row['macs'] / 1e6:.1f} | {row['params']:,} | {' | '.join(top1)} | "
            f"{row.get('fp32_backend', '-')} | {row.get('fp32_ms', float('nan')):.2f} | "
            f"{row.get('int8_backend', '-')} | {row.get('int8_ms', float('nan')):.2f} |"
        )
    print("\n| model | recipe | status | top-1 | channels | |gamma| < 1e-3 | removable | MMACs | after | top-1 after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in result["fair_test"]["rows"]:
        if row["status"] == "pending":
            print(f"| {row['model']} | {row['recipe']} | pending | | | | | | | |")
            continue
        print(
            f"| {row['model']} | {row['recipe']} | {row['status']} | {row['top1']}% | {row['channels']:,} | "
            f"{row['gamma_below_1e_3']:,} | {row['removable_channels']:,} | {row['macs'] / 1e6:.1f} | "
            f"{row['macs_after'] / 1e6:.1f} | {row['top1_after']}% |"
        )
