"""The CIFAR-10 study's report: every finished step collected into one JSON, its plots and tables."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cifar10_head_to_head import collect as head_to_head_rows
from cifar10_runs import PUBLISHED_CHECK_IMAGES, PUBLISHED_MODEL, RUN_LISTS, Preset, run_history


def sparsity_measures(run_dir: Path, data: str, preset: Preset, images: int = 500) -> dict:
    """How much of the run's best model is off, by the numbers: channels with |gamma| < 1e-3; channels
    zero after ReLU on every one of ``images`` balanced val images (activation-measured); and what
    exact pruning at 1e-3 would keep of the MACs, with the output change it causes. Cached in the run."""
    cached = run_dir / "sparsity_measures.json"
    if not cached.exists():
        import selecsls
        from selecsls.data.datasets import TransformedDataset, balanced_subset, build_loader
        from selecsls.data.transforms import eval_transform_for
        from selecsls.train.evaluation import validation_data

        model = selecsls.load(run_dir / "best.pt").eval()
        dataset = validation_data(data, model)
        loader = build_loader(
            TransformedDataset(dataset, eval_transform_for(model.card.preprocessing)),
            balanced_subset(dataset.targets, images, 0),
            100,
            0,
        )
        analysis = selecsls.analyze_sparsity(model, 1e-3, loader)
        pruned = selecsls.prune(model, 1e-3, max_output_change=None)
        size = (1, 3, preset.img_size, preset.img_size)
        result = dict(
            channels=analysis.total_channels,
            gamma_below_1e_3=sum(int(layer.low_scale.sum()) for layer in analysis.layers),
            dead_on_val=sum(int(layer.dead.sum()) for layer in analysis.layers),
            val_images=images,
            pruned_macs_fraction=selecsls.count_macs(pruned, size) / selecsls.count_macs(model, size),
            pruned_output_change=pruned.output_change,
        )
        cached.write_text(json.dumps(result) + "\n")
    return json.loads(cached.read_text())


def report(out: Path, data: str, preset: Preset, destination: Path) -> None:
    """Collect every finished step into ``destination`` (JSON) and plots beside it; print the tables."""
    runs = {}
    figures = destination.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    for spec in RUN_LISTS[preset.runs]:
        history = run_history(out / spec.name)
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
            runs[spec.name]["sparsity"] = sparsity_measures(out / spec.name, data, preset)
        histograms = out / spec.name / "gamma_histograms.png"
        if spec.question == "sparsity" and histograms.exists():
            shutil.copyfile(histograms, figures / f"gamma-{spec.name}.png")
    evaluations = {
        str(path.relative_to(out)).removesuffix(".eval.json"): json.loads(path.read_text())
        for path in sorted(out.rglob("*.eval.json"))
    }
    latency = {
        path.stem.removeprefix("latency-"): json.loads(path.read_text()) for path in sorted(out.glob("latency-*.json"))
    }
    source = out / "prune_source.txt"
    pilots = out / "pilots.json"
    result = dict(
        preset=preset.__dict__,
        runs=runs,
        pilots=json.loads(pilots.read_text()) if pilots.exists() else {},
        prune_source=source.read_text().strip() if source.exists() else None,
        evaluations=evaluations,
        latency=latency,
        pruned_vs_resnet50=pruned_vs_resnet50(out, "bench-pruned-vs-resnet50.json"),
        head_to_head=head_to_head_rows(out),
        cpu=_cpu(),
    )
    if "published" in evaluations:  # the committed model: where it is, its latency (the pruned network's), its checks
        examples = out / "published-examples.json"
        evaluations["published"] |= dict(
            model_file=str(PUBLISHED_MODEL),
            latency=[row for row in result["pruned_vs_resnet50"] if row["model"] in ("pruned-1e-3.pt", "resnet50")],
            balanced_subset=evaluations.pop(f"published.limit-{PUBLISHED_CHECK_IMAGES}", None),
            example_predictions=json.loads(examples.read_text()) if examples.exists() else None,
        )
    destination.write_text(json.dumps(result, indent=1) + "\n")
    _plot(runs, figures)
    if result["head_to_head"]:
        _plot_pareto(result["head_to_head"], figures / "pareto.png")
    _print_tables(result)


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
    fig.savefig(folder / "curves.png", dpi=90)


def _plot_pareto(rows: list[dict], path: Path) -> None:
    """Top-1 against batch-1 CPU latency on each model's fastest backend, fp32 and int8 side by side:
    one colour per family, hollow markers for dense models, each family's Pareto front drawn."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6))
    for ax, precision in zip(fig.subplots(1, 2), ("fp32", "int8"), strict=True):
        accuracy = "top1" if precision == "fp32" else "int8_top1"
        for family, color in (("selecsls42b", "tab:blue"), ("resnet50", "tab:red")):
            points = sorted(
                (row[f"{precision}_ms"], row[accuracy], row)
                for row in rows
                if row["family"] == family and f"{precision}_ms" in row
            )
            for latency, top1, row in points:
                face = "none" if row["name"].endswith(" dense") else color
                ax.scatter(latency, top1, color=color, facecolors=face, zorder=3)
                ax.annotate(
                    row["name"].removeprefix(f"{family} "),
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
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


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
    for row in result["head_to_head"]:
        pruned = "-" if row["top1_after_pruning"] is None else f"{row['top1_after_pruning']:.2f}%"
        print(
            f"| {row['name']} | {row['macs'] / 1e6:.1f} | {row['params']:,} | {pruned} | {row['top1']:.2f}% | "
            f"{row['int8_top1']:.2f}% | {row.get('fp32_backend', '-')} | {row.get('fp32_ms', float('nan')):.2f} | "
            f"{row.get('int8_backend', '-')} | {row.get('int8_ms', float('nan')):.2f} |"
        )
