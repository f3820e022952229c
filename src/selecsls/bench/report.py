"""Present a :func:`selecsls.bench.runner.run_benchmark` result: terminal tables, JSON, PNG plot.

Every ratio is to the reference model (ResNet-50) measured in the same run: speed-up is the
reference's eager median latency over this median at the same batch and image size; a memory
fraction is this model's bytes over the reference's. The best-vs-best table compares each
model's fastest backend with the reference's fastest of the same precision.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from selecsls._io import atomic_path, atomic_write
from selecsls._optional import require
from selecsls.bench.reliability import advice, assess, row_key
from selecsls.bench.runner import size_label

__all__ = ["format_report", "plot_figure", "write_json", "write_plot"]

MIB = 2**20
# Memory measures in the result, with their table titles.
MEMORY_MEASURES = {
    "saved_tensor_bytes": "Activations saved for backward, one training forward pass (exact, machine-independent)",
    "cuda_training_peak_bytes": "Peak CUDA memory of one training step above weights and optimizer state",
    "inference_rss_growth_bytes": "Peak process RSS growth of one steady-state CPU inference call",
    "inference_live_peak_bytes": "Peak live tensor memory of one steady-state CPU inference call "
    "(activations, workspaces, per-call weight copies)",
    "weight_bytes": "Weights (parameters and buffers)",
    "process_load_peak_bytes": "Whole process serving the model (above a fresh process with torch and selecsls "
    "imported), peak while loading the model file and readying the engine",
    "process_run_peak_bytes": "Whole process, peak during 3 batch-1 calls at the first --memory-sizes size, the "
    "model ready (the original dropped)",
    "process_steady_bytes": "Whole process, resident memory after those 3 calls",
}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def _ratio(value: float | None, reference: float | None, suffix: str) -> str:
    return f"{value / reference:.2f}{suffix}" if value and reference else "-"


def _machine_line(result: dict) -> str:
    machine, settings = result["machine"], result["settings"]
    load = machine.get("load_average")
    load_text = f", load average {load[0]:.1f} at start, {machine['load_average_end'][0]:.1f} at end" if load else ""
    precision = "AMP" if settings["amp"] else "fp32"
    return (
        f"{machine['cpu']} ({machine['cpu_count']} CPUs), {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}, device {machine['device']}, {precision}{load_text}"
    )


def _row_label(row: dict) -> str:
    """'resnet50 eager b1 224px': one latency row of one cell."""
    return f"{row['model']} {row['backend']} b{row['batch']} {size_label(row['height'], row['width'])}px"


def _latency_table(result: dict, unreliable: set[tuple]) -> str:
    """Medians (IQR) per model and backend, ``!`` after the ``unreliable`` ones; speed-up vs the reference's
    eager run and, with several backends, vs the reference on the same backend (equal footing: same runtime
    and precision)."""
    records = {row_key(r): r for r in result["latency"]}
    cells = list(dict.fromkeys(key[2:] for key in records))
    several_backends = len(result["settings"]["backends"]) > 1
    reference = result["reference"]

    def reference_median(backend: str, batch: int, height: int, width: int) -> float | None:
        return records.get((reference, backend, batch, height, width), {}).get("summary", {}).get("median")

    rows, skipped = [], []
    for model, backend in dict.fromkeys(key[:2] for key in records):
        row = [f"{model} {backend}"]
        for batch, height, width in cells:
            record = records[(model, backend, batch, height, width)]
            if record["status"] != "ok":
                row += ["skipped", "-"] + (["-"] if several_backends else [])
                skipped.append(f"  {model} {backend}: {record['reason']}")
                continue
            median, iqr = record["summary"]["median"], record["summary"]["iqr"]
            row += [
                f"{median * 1e3:.1f} ({iqr * 1e3:.1f})"
                + (" !" if (model, backend, batch, height, width) in unreliable else ""),
                _ratio(reference_median("eager", batch, height, width), median, "x"),
            ]
            if several_backends:
                row.append(_ratio(reference_median(backend, batch, height, width), median, "x"))
        rows.append(row)
    header = ["model backend"]
    for batch, height, width in cells:
        header += [f"b{batch} {size_label(height, width)}px ms (IQR)", f"x {reference} eager"] + (
            [f"x {reference} same"] if several_backends else []
        )
    notes = "\n".join(dict.fromkeys(skipped))
    return _table(header, rows) + (f"\nskipped:\n{notes}" if notes else "")


def _best_table(result: dict) -> str:
    """One row per precision, shape and model: the fastest backend, ms, frames/s, speed-up vs the
    reference's fastest of that precision, and the MAC bound (the speed-up at equal efficiency per MAC)."""
    rows = sorted(
        result["best_vs_best"],
        key=lambda r: (r["precision"] != "fp32", r["precision"], r["batch"], r["height"] * r["width"], r["height"]),
    )
    header = ["precision", "batch", "size", "model", "fastest backend", "ms", "frames/s", f"x {result['reference']}"]
    header.append("MAC bound")
    table = [
        [
            row["precision"],
            str(row["batch"]),
            size_label(row["height"], row["width"]),
            row["model"],
            row["backend"],
            f"{row['median_s'] * 1e3:.1f}",
            f"{row['frames_per_s']:.1f}",
            f"{row['speedup']:.2f}x" if row["speedup"] else "-",
            f"{row['mac_bound']:.2f}x" if row["mac_bound"] else "-",
        ]
        for row in rows
    ]
    return _table(header, table)


def _giga(macs: int | None) -> str:
    """MACs in billions; '-' at a size a model was not counted at (a compiled package has one size)."""
    return "-" if macs is None else f"{macs / 1e9:.2f}"


def _models_table(result: dict) -> str:
    sizes = list(dict.fromkeys(size for info in result["models"].values() for size in info["macs_per_image"]))
    header = ["model", "params (M)", *(f"GMACs {size}px" for size in sizes)]
    rows = [
        [name, f"{info['params'] / 1e6:.2f}", *(_giga(info["macs_per_image"].get(size)) for size in sizes)]
        for name, info in result["models"].items()
    ]
    return _table(header, rows)


def _memory_table(measure: str, values: dict[str, dict[str, int]], reference: str) -> str:
    keys = list(dict.fromkeys(key for per_model in values.values() for key in per_model))
    header = ["model"]
    for key in keys:
        header += [f"{key} MiB", f"x {reference}"]
    rows = []
    for name, per_model in values.items():
        row = [name]
        for key in keys:
            row += [f"{per_model[key] / MIB:.1f}", _ratio(per_model[key], values.get(reference, {}).get(key), "")]
        rows.append(row)
    return f"{MEMORY_MEASURES[measure]}:\n" + _table(header, rows)


def format_report(result: dict) -> str:
    """The terminal report: machine, models, latency with speed-ups, memory with fractions, and last
    whether the timings can be trusted (:mod:`selecsls.bench.reliability`)."""
    reliability = assess(result)
    unreliable = {row_key(row) for row in reliability["unreliable"]}
    parts = [
        _machine_line(result),
        _models_table(result),
        "Latency, median of interleaved rounds in ms (inter-quartile range); speed-up vs "
        f"{result['reference']} at the same batch and size"
        + ("; ! marks an unreliable row (see the end)" if unreliable else "")
        + ":\n"
        + _latency_table(result, unreliable),
    ]
    if len(result["settings"]["backends"]) > 1 and result.get("best_vs_best"):
        parts.append(
            f"Best vs best: each model's fastest backend against {result['reference']}'s fastest of the same "
            "precision (MAC bound: the speed-up at equal efficiency per multiply-accumulate):\n" + _best_table(result)
        )
    memory = result["memory"]
    parts += [
        _memory_table(measure, memory[measure], result["reference"]) for measure in MEMORY_MEASURES if measure in memory
    ]
    if "skipped" in memory:
        parts.append(f"memory measure skipped: {memory['skipped']}")
    for engine, reason in memory.get("process_memory_skipped", {}).items():
        parts.append(f"whole-process memory on {engine} skipped: {reason}")
    parts.append(advice(reliability, _row_label))
    return "\n\n".join(parts)


def write_json(result: dict, path: str | os.PathLike) -> None:
    """The result with its reliability assessment (which rows to distrust, and why)."""
    with atomic_write(path, "w") as handle:
        json.dump({**result, "reliability": assess(result)}, handle, indent=1)
        handle.write("\n")


def _grouped_bars(axes, groups: list[str], series: dict[str, list[float]]) -> None:
    """One group of bars per entry of ``groups``, one bar per series (legend label -> values)."""
    width = 0.8 / max(len(series), 1)
    for index, (label, values) in enumerate(series.items()):
        axes.bar([g + index * width for g in range(len(groups))], values, width, label=label)
    axes.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
    axes.legend(fontsize="small")


def _plot_latency(axes, result: dict, unreliable: set[tuple]) -> None:
    """Eager time per image (median batch latency / batch, so batch 16 shares the axis) vs image size, one
    line per model and batch with IQR error bars; unreliable points ringed red; the legend below the axes."""
    eager = [r for r in result["latency"] if r["backend"] == "eager" and r["status"] == "ok"]
    batches = sorted({r["batch"] for r in eager})
    styles = ["-o", "--s", ":^", "-.v"]
    flagged = []
    for index, model in enumerate(result["models"]):
        for batch, style in zip(batches, styles * len(batches)):
            rows = sorted(
                (r for r in eager if r["model"] == model and r["batch"] == batch),
                key=lambda r: r["height"] * r["width"],
            )
            if not rows:
                continue
            sides = [(r["height"] * r["width"]) ** 0.5 for r in rows]
            median, q1, q3 = ([r["summary"][q] * 1e3 / batch for r in rows] for q in ("median", "q1", "q3"))
            spread = [[m - low for m, low in zip(median, q1)], [high - m for m, high in zip(median, q3)]]
            axes.errorbar(
                sides, median, spread, fmt=style, color=f"C{index % 10}", capsize=3, label=f"{model} b{batch}"
            )
            flagged += [(side, m) for side, m, r in zip(sides, median, rows) if row_key(r) in unreliable]
    if flagged:
        axes.plot(*zip(*flagged), "o", ms=14, mfc="none", mec="red", mew=1.5, label="unreliable (see the report)")
    axes.set(
        xlabel="image size, sqrt(height x width) (px)",
        ylabel="ms per image (median batch latency / batch)",
        yscale="log",
        title="Eager inference time per image (bars: IQR)",
    )
    if axes.lines:  # eager may not be among the timed backends
        axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)


def plot_figure(result: dict):
    """The benchmark figure: eager time per image vs image size per model and batch; with several backends,
    best-vs-best frames/s per shape and precision; saved-activation memory per model."""
    require("matplotlib", "to plot benchmark results").use("Agg")
    plt = require("matplotlib.pyplot", "to plot benchmark results")

    show_best = len(result["settings"]["backends"]) > 1 and bool(result.get("best_vs_best"))
    figure, axes = plt.subplots(1, 3 if show_best else 2, figsize=(18 if show_best else 12, 6))
    memory_axes = axes[-1]
    _plot_latency(axes[0], result, {row_key(row) for row in assess(result)["unreliable"]})

    if show_best:
        best = result["best_vs_best"]
        groups = list(
            dict.fromkeys(f"{r['precision']} b{r['batch']} {size_label(r['height'], r['width'])}" for r in best)
        )
        rate = {
            (r["model"], f"{r['precision']} b{r['batch']} {size_label(r['height'], r['width'])}"): r["frames_per_s"]
            for r in best
        }
        _grouped_bars(
            axes[1], groups, {model: [rate.get((model, group), 0.0) for group in groups] for model in result["models"]}
        )
        axes[1].set(ylabel="frames/s (fastest backend)", title="Best vs best")

    saved = result["memory"]["saved_tensor_bytes"]
    keys = list(dict.fromkeys(key for per_model in saved.values() for key in per_model))
    _grouped_bars(
        memory_axes,
        list(saved),
        {f"batch x size {key}": [per_model[key] / MIB for per_model in saved.values()] for key in keys},
    )
    memory_axes.set(ylabel="MiB", yscale="log", title="Activations saved for backward")
    figure.tight_layout()
    return figure


def write_plot(result: dict, path: str | os.PathLike) -> None:
    """:func:`plot_figure` as a PNG."""
    figure = plot_figure(result)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    require("matplotlib.pyplot", "to plot benchmark results").close(figure)
