"""Per-layer roofline at batch 1: where SelecSLS and ResNet-50 spend their time, and what bounds each conv.

    python benchmarks/roofline.py                                       # selecsls60, resnet50 at 224 and 512x320
    python benchmarks/roofline.py --models selecsls42b --sizes 512x320 --threads 2 --output roofline42b
    OMP_NUM_THREADS=1 python benchmarks/roofline.py --models selecsls42b,resnet50 --sizes 224 --threads 1 \
        --frozen --cold-kernels

Machine peaks first: fp32 GFLOP/s of a large matmul, GB/s of a large copy (bytes read + written),
and GB/s of a weight-streaming matrix-vector product (the batch-1 extreme: every weight used once).
Then every conv of the BN-fused model is timed *inside* full forward passes (forward hooks,
median over rounds): at batch 1 the weights (~120 MB for selecsls60) exceed the caches, so each
layer reads its weights from memory as it does in deployment. Per conv: MACs, weight and
activation bytes, achieved GFLOP/s and GB/s, arithmetic intensity (FLOP per byte moved) and the
roofline bound min(peak FLOP/s, intensity x copy bandwidth). A layer whose intensity times the
bandwidth is below the FLOP peak is memory-bound: only fewer bytes (int8, bf16 weights) speed it up.

``--frozen`` times the ``selecsls.freeze`` snapshot's convs instead (weights packed for oneDNN, the
default CPU path), and ``--cold-kernels`` adds, for the three slowest 3x3 convs of each run, every exact
kernel torch offers for them (oneDNN's packed conv, im2col + ``addmm`` / ``linear``, MKL's packed GEMM)
timed with the caches flushed before each call, as inside the network at batch 1.

Writes PREFIX.json (machine, every layer) and PREFIX.md (per model and size: one row per stage,
then the ten slowest convs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from selecsls import create_model, freeze
from selecsls.bench.runner import machine_description, parse_size, time_interleaved
from selecsls.deploy.freeze import PackedConv2d
from selecsls.deploy.runtimes import fused_model
from selecsls.models.complexity import count_macs

#: Bytes read between two calls of a kernel timed cold: more than the machine's caches hold.
FLUSH_BYTES = 384 * 2**20


def timed(fn, repeats: int, summary=statistics.median, warmup: int = 2) -> float:
    """``summary`` of ``repeats`` timed calls after ``warmup`` untimed ones (the package's timer)."""
    return summary(time_interleaved({"call": fn}, warmup, repeats)["call"])


def machine_peaks(repeats: int) -> dict[str, float]:
    """Large sgemm GFLOP/s, large copy GB/s (read + write), weight-streaming GEMV GB/s: the fastest
    call of each (a peak; the median is pulled down by other jobs on a shared machine)."""
    with torch.no_grad():
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        matmul = 2 * 2048**3 / timed(lambda: a @ b, repeats, min) / 1e9
        source = torch.ones(64 * 2**20)  # 256 MB, far beyond any cache
        target = torch.empty_like(source)
        copy = 2 * source.numel() * 4 / timed(lambda: target.copy_(source), repeats, min) / 1e9
        weights, vector = torch.randn(9216, 1024), torch.randn(1024, 1)  # 37.7 MB: head.2 of selecsls60
        gemv = weights.numel() * 4 / timed(lambda: torch.mm(weights, vector), repeats, min) / 1e9
    return dict(matmul_gflops=matmul, copy_gbs=copy, gemv_gbs=gemv)


def conv_layers(model: nn.Module, example: torch.Tensor, repeats: int) -> tuple[list[dict], float]:
    """Every conv of ``model`` timed inside full forward passes; also the median forward time."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, PackedConv2d))}
    times: dict[str, list[float]] = defaultdict(list)
    shapes: dict[str, tuple] = {}
    starts: dict[str, float] = {}

    def before(name):
        return lambda module, inputs: starts.__setitem__(name, time.perf_counter())

    def after(name):
        def hook(module, inputs, output):
            times[name].append(time.perf_counter() - starts[name])
            shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))

        return hook

    handles = [m.register_forward_pre_hook(before(name)) for name, m in convs.items()]
    handles += [m.register_forward_hook(after(name)) for name, m in convs.items()]
    with torch.no_grad():
        forward = timed(lambda: model(example), repeats)
    for handle in handles:
        handle.remove()
    rows = []
    for name, conv in convs.items():
        (_, cin, h_in, w_in), (_, cout, h_out, w_out) = shapes[name]
        seconds = statistics.median(times[name][-repeats:])
        kernel = conv.weight.shape[-1]  # (out, in / groups, k, k), packed or not
        macs = cout * h_out * w_out * (cin // conv.groups) * kernel * kernel
        weight_bytes = conv.weight.numel() * 4
        activation_bytes = (cin * h_in * w_in + cout * h_out * w_out) * 4
        rows.append(
            dict(
                layer=name,
                # selecsls: stem, features, head; resnet50: conv1, layer1-4 (frozen: network.head_1_conv)
                stage=name.removeprefix("network.").split(".")[0].split("_")[0],
                kernel=kernel,
                stride=conv.stride[0],
                cin=cin,
                cout=cout,
                in_hw=[h_in, w_in],
                out_hw=[h_out, w_out],
                ms=seconds * 1e3,
                macs=macs,
                weight_bytes=weight_bytes,
                activation_bytes=activation_bytes,
            )
        )
    return rows, forward


def cold_kernels(row: dict, repeats: int) -> dict[str, float]:
    """ms of each exact kernel for one 3x3 conv of ``row`` (padding 1, batch 1), the caches flushed
    before every call: oneDNN's packed conv, im2col + ``addmm`` (weight K x N), im2col + ``linear``
    (weight N x K), im2col + MKL's packed GEMM. The im2col itself is included."""
    cin, cout, stride, (height, width) = row["cin"], row["cout"], row["stride"], row["in_hw"]
    weight, bias = torch.randn(cout, cin, 3, 3) / (3 * cin**0.5), torch.randn(cout)
    image = torch.randn(1, cin, height, width).contiguous(memory_format=torch.channels_last)
    flush = torch.ones(FLUSH_BYTES // 4)
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.to_mkldnn(), [1, 1], [stride] * 2, [1, 1], 1, list(image.shape)
    )
    rows_by_k = weight.reshape(cout, -1).contiguous()
    k_by_n = rows_by_k.t().contiguous()
    positions = row["out_hw"][0] * row["out_hw"][1]
    mkl = torch.ops.mkl._mkl_reorder_linear_weight(rows_by_k, positions)

    def columns():
        return F.unfold(image, 3, padding=1, stride=stride)[0].t()

    kernels = {
        "onednn_packed": lambda: torch.ops.mkldnn._convolution_pointwise(
            image, packed, bias, [1, 1], [stride] * 2, [1, 1], 1, "none", [], ""
        ),
        "im2col_addmm": lambda: torch.addmm(bias, columns(), k_by_n),
        "im2col_linear": lambda: F.linear(columns(), rows_by_k, bias),
        "im2col_mkl_packed": lambda: torch.ops.mkl._mkl_linear(columns(), mkl, rows_by_k, bias, positions),
    }
    result = {}
    with torch.no_grad():
        for name, kernel in kernels.items():
            kernel()
            samples = []
            for _ in range(repeats):
                flush.sum()
                start = time.perf_counter()
                kernel()
                samples.append(time.perf_counter() - start)
            result[name] = statistics.median(samples) * 1e3
    return result


def add_roofline(row: dict, peaks: dict[str, float]) -> dict:
    seconds, flops, moved = row["ms"] / 1e3, 2 * row["macs"], row["weight_bytes"] + row["activation_bytes"]
    intensity = flops / moved
    attainable = min(peaks["matmul_gflops"], intensity * peaks["copy_gbs"])
    achieved = flops / seconds / 1e9
    return dict(
        row,
        gflops=achieved,
        gbs=moved / seconds / 1e9,
        flop_per_byte=intensity,
        bound="memory" if intensity * peaks["copy_gbs"] < peaks["matmul_gflops"] else "compute",
        fraction_of_roofline=achieved / attainable,
    )


def stage_table(rows: list[dict]) -> list[dict]:
    stages: dict[str, dict] = {}
    for row in rows:
        stage = stages.setdefault(row["stage"], dict(stage=row["stage"], convs=0, ms=0.0, macs=0, weight_bytes=0))
        stage["convs"] += 1
        stage["ms"] += row["ms"]
        stage["macs"] += row["macs"]
        stage["weight_bytes"] += row["weight_bytes"]
    return list(stages.values())


def markdown(report: dict) -> str:
    peaks = report["machine"]
    lines = [
        f"Machine: {peaks['cpu']}, {peaks['threads']} threads, load average {peaks['load_average'][0]:.1f}. "
        f"Peaks: matmul {peaks['matmul_gflops']:.1f} GFLOP/s, copy {peaks['copy_gbs']:.1f} GB/s (read + write), "
        f"weight-streaming GEMV {peaks['gemv_gbs']:.1f} GB/s; ridge point "
        f"{peaks['matmul_gflops'] / peaks['copy_gbs']:.1f} FLOP/byte.",
    ]
    for run in report["runs"]:
        total = sum(stage["ms"] for stage in run["stages"])
        lines += [
            "",
            f"### {run['model']} at {run['size']} (forward {run['forward_ms']:.1f} ms, convs {total:.1f} ms)",
            "",
            "| stage | convs | ms | share | GMACs | weights MB | GFLOP/s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for stage in run["stages"]:
            lines.append(
                f"| {stage['stage']} | {stage['convs']} | {stage['ms']:.1f} | {stage['ms'] / total:.0%} | "
                f"{stage['macs'] / 1e9:.2f} | {stage['weight_bytes'] / 1e6:.1f} | "
                f"{2 * stage['macs'] / (stage['ms'] / 1e3) / 1e9:.1f} |"
            )
        lines += [
            "",
            "| slowest convs | k/s | in -> out | ms | MMACs | weights MB | FLOP/byte | GFLOP/s | GB/s | bound "
            "| of roofline |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in sorted(run["layers"], key=lambda r: -r["ms"])[:10]:
            (h_in, w_in), (h_out, w_out) = row["in_hw"], row["out_hw"]
            cells = [
                row["layer"],
                f"{row['kernel']}/{row['stride']}",
                f"{row['cin']}@{h_in}x{w_in} -> {row['cout']}@{h_out}x{w_out}",
                f"{row['ms']:.2f}",
                f"{row['macs'] / 1e6:.0f}",
                f"{row['weight_bytes'] / 1e6:.1f}",
                f"{row['flop_per_byte']:.0f}",
                f"{row['gflops']:.1f}",
                f"{row['gbs']:.1f}",
                row["bound"],
                f"{row['fraction_of_roofline']:.0%}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if run.get("cold_kernels"):
            names = list(next(iter(run["cold_kernels"].values())))
            lines += ["", "| cold, ms | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
            for layer, kernels in run["cold_kernels"].items():
                lines.append(f"| {layer} | " + " | ".join(f"{kernels[name]:.2f}" for name in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="selecsls60,resnet50")
    parser.add_argument("--sizes", default="224,512x320", help="comma-separated: 224 or WIDTHxHEIGHT")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", default="roofline", metavar="PREFIX")
    parser.add_argument("--frozen", action="store_true", help="time selecsls.freeze's snapshot, not eager fused")
    parser.add_argument("--cold-kernels", action="store_true", help="every exact kernel for the slowest 3x3 convs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_description("cpu")
    peaks = machine_peaks(args.repeats)
    report = dict(
        machine=dict(
            cpu=machine["cpu"],
            threads=args.threads,
            load_average=machine["load_average"],
            torch=torch.__version__,
            **peaks,
        )
    )
    report["runs"] = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = create_model(name).eval()
        timed_model = freeze(model) if args.frozen else fused_model(model, torch.device("cpu")).eval()
        for text in args.sizes.split(","):
            height, width = parse_size(text)
            example = torch.randn(1, 3, height, width)
            layers, forward = conv_layers(timed_model, example, args.repeats)
            run = dict(
                model=name,
                size=text,
                forward_ms=forward * 1e3,
                macs=count_macs(model, (1, 3, height, width)),
                layers=[add_roofline(row, peaks) for row in layers],
            )
            run["stages"] = stage_table(run["layers"])
            if args.cold_kernels:
                slowest = sorted((r for r in layers if r["kernel"] == 3), key=lambda r: -r["ms"])[:3]
                run["cold_kernels"] = {r["layer"]: cold_kernels(r, args.repeats) for r in slowest}
            report["runs"].append(run)
            print(f"{name} {text}: forward {forward * 1e3:.1f} ms", flush=True)
    report["machine"]["load_average_end"] = os.getloadavg()
    with open(f"{args.output}.json", "w") as handle:
        json.dump(report, handle, indent=1)
    text = markdown(report)
    with open(f"{args.output}.md", "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
