"""The bench on a busy machine (issue 27, item 8): detected from injected load readings and timings, said in
the table and at the end, marked in the plot; the plot's error bars, per-image axis and legend."""

import json

import pytest

from selecsls.bench.reliability import MAX_RELATIVE_SPREAD, assess
from selecsls.bench.report import format_report, plot_figure, write_json
from selecsls.bench.runner import summarize

QUIET = [0.0580, 0.0585, 0.0590, 0.0595, 0.0600, 0.0590, 0.0588]  # IQR about 1% of the median


def _row(model, samples, batch=1, side=224, load=0.5):
    return dict(
        model=model,
        backend="eager",
        batch=batch,
        height=side,
        width=side,
        status="ok",
        samples_s=samples,
        summary=summarize(samples),
        load_average=[load, load, load],
    )


def _result(rows, start=0.5, end=0.5, cores=2):
    models = dict.fromkeys(row["model"] for row in rows)
    sizes = {str(row["height"]) for row in rows}
    return dict(
        machine=dict(
            cpu="test CPU",
            cpu_count=cores,
            torch_threads=cores,
            torch="2",
            device="cpu",
            load_average=[start] * 3,
            load_average_end=[end] * 3,
        ),
        settings=dict(amp=False, backends=["eager"]),
        reference="resnet50",
        models={m: dict(params=1, macs_per_image=dict.fromkeys(sizes, 10**9)) for m in models},
        latency=rows,
        best_vs_best=[],
        memory={"saved_tensor_bytes": {m: {"1x224": 2**20} for m in models}},
    )


def test_a_quiet_machine_is_reliable_and_says_so():
    result = _result([_row("resnet50", QUIET), _row("selecsls42b", [s / 2 for s in QUIET])])
    assessment = assess(result)
    assert not assessment["busy"] and assessment["unreliable"] == []
    report = format_report(result)
    assert " !" not in report and report.splitlines()[-1].startswith("Timings look reliable: load average 0.5")


def test_load_above_the_cores_before_the_run_marks_the_first_cell_and_says_what_to_do():
    rows = [_row("resnet50", QUIET, load=1.0), _row("resnet50", QUIET, batch=16, load=1.0)]
    result = _result(rows, start=3.5)
    assessment = assess(result)
    assert assessment["busy"] and assessment["load_readings"] == [3.5, 1.0, 1.0, 0.5]
    [flagged] = assessment["unreliable"]  # the first cell is bracketed by the start's reading; the second is not
    assert (flagged["batch"], flagged["problems"]) == (1, ["load 3.5 above 2 cores"])
    report = format_report(result)
    assert "! marks an unreliable row" in report and "59.0 (0.6) !" in report
    assert "UNRELIABLE TIMINGS (1 row(s) marked !): the machine was busy" in report
    assert "  resnet50 eager b1 224px: load 3.5 above 2 cores" in report
    assert "What to do: rerun when the load average (`uptime`) stays below the number of cores" in report


def test_load_during_the_run_marks_the_cells_it_brackets():
    rows = [_row("resnet50", QUIET, side=224, load=0.5), _row("resnet50", QUIET, side=512, load=4.0)]
    assessment = assess(_result(rows, start=0.5, end=0.5))
    assert [(row["height"], row["problems"]) for row in assessment["unreliable"]] == [(512, ["load 4.0 above 2 cores"])]


def test_a_wide_spread_marks_the_row_even_on_a_quiet_machine():
    wide = [0.058, 0.060, 0.120, 0.059, 1.2, 0.061, 0.9]  # IQR above the median, as at load 3-4
    result = _result([_row("resnet50", QUIET), _row("selecsls42b", wide)])
    summary = summarize(wide)
    assert summary["iqr"] > MAX_RELATIVE_SPREAD * summary["median"]
    [flagged] = assess(result)["unreliable"]
    assert flagged["model"] == "selecsls42b" and flagged["problems"][0].startswith("IQR ")
    report = format_report(result)
    assert "the spread of some rows is above 50% of their median" in report and "selecsls42b eager b1 224px" in report


def test_a_result_without_load_readings_is_judged_by_its_spread():
    row = _row("resnet50", QUIET)
    del row["load_average"]
    result = _result([row])
    result["machine"].update(load_average=None, load_average_end=None)
    assert assess(result) == dict(
        cores=2, load_readings=[], busy=False, max_relative_spread=MAX_RELATIVE_SPREAD, unreliable=[]
    )
    assert "load average not readable here" in format_report(result)


def test_the_json_carries_the_assessment(tmp_path):
    result = _result([_row("resnet50", QUIET)], start=5.0)
    write_json(result, tmp_path / "bench.json")
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["reliability"]["busy"] and saved["reliability"]["unreliable"][0]["model"] == "resnet50"


@pytest.fixture
def figure():
    rows = [
        _row("resnet50", QUIET),
        _row("resnet50", [16 * s for s in QUIET], batch=16, load=3.0),
        _row("selecsls42b", [s / 2 for s in QUIET]),
        _row("selecsls42b", [8 * s for s in QUIET], batch=16, load=3.0),
    ]
    figure = plot_figure(_result(rows))
    yield figure
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_the_plot_shows_time_per_image_with_iqr_bars(figure):
    axes = figure.axes[0]
    assert len(axes.containers) == 4  # one error-bar series per model and batch
    batch16 = next(c for c in axes.containers if c.get_label() == "resnet50 b16")
    assert batch16.lines[0].get_ydata()[0] == pytest.approx(summarize(QUIET)["median"] * 1e3)  # per image
    assert "per image" in axes.get_ylabel()


def test_the_plot_rings_unreliable_points(figure):
    axes = figure.axes[0]
    [rings] = [line for line in axes.lines if line.get_label() == "unreliable (see the report)"]
    assert len(rings.get_xdata()) == 2 and rings.get_markeredgecolor() == "red"


def test_the_legend_does_not_cover_the_lines(figure):
    figure.canvas.draw()
    axes = figure.axes[0]
    legend = axes.get_legend().get_window_extent()
    assert not legend.overlaps(axes.get_window_extent())
