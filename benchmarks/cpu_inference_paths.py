"""CPU inference paths side by side: SelecSLS vs ResNet-50, eager to int8, interleaved medians.

    python benchmarks/cpu_inference_paths.py                    # selecsls60 vs resnet50, 512x512, batch 1
    python benchmarks/cpu_inference_paths.py --size 224 --repeats 30 --paths eager fused_channels_last int8

Every path of every model is timed round-robin (``selecsls.bench.runner.time_interleaved``), so
drift on a busy machine hits them alike; the table gives medians, the speed-up over the
same model's ``eager`` path and, at equal path, SelecSLS's speed-up over ResNet-50. Each
path's outputs are compared with the model's eager outputs: fp32 paths must be exact
(max abs diff <= 1e-4 of the output scale); ``pruned`` and ``int8`` change the function and
report their difference. ``straightforward`` is SelecSLS with the textbook block forward
(modules and ``torch.cat``), the baseline the package's block must match or beat.
The package's conv6 (``selecsls.models.network.ConcatConvNormAct``) skips the concatenation in
training only (to save activation memory); in eval mode it runs the textbook
``torch.cat`` + 1x1 conv, which measured 2-7% faster here than the copy-free sum of
per-branch convs. ``straightforward`` and ``fused_straightforward`` check that the
package's ``eager`` and ``fused`` paths stay as fast as the textbook block.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import types

import torch

from selecsls import create_model
from selecsls.bench.runner import summarize, time_interleaved
from selecsls.deploy.backends import BACKENDS, BackendUnavailable
from selecsls.deploy.export import RELATIVE_TOLERANCE
from selecsls.deploy.runtimes import fused_model
from selecsls.models.compare import relative_difference
from selecsls.models.network import SelecSLS

EXACT_PATHS = (
    "straightforward",
    "eager",
    "fused",
    "channels_last",
    "fused_channels_last",
    "fused_straightforward",
    "onnxruntime",
)


def straightforward_block_forward(self, x, skip):
    """The textbook SelecSLS block: three branches, ``torch.cat``, 1x1 conv."""
    d1 = self.conv1(x)
    d2 = self.conv3(self.conv2(d1))
    d3 = self.conv5(self.conv4(d2))
    mix = self.conv6
    return mix.act(mix.bn(mix.conv(torch.cat([d1, d2, d3] if self.is_first else [d1, d2, d3, skip], 1))))


def textbook(model):
    """``model`` (modified in place) with the textbook block forward."""
    if not isinstance(model, SelecSLS):
        raise BackendUnavailable("SelecSLS only: the reference implementation of its block")
    for block in model.features:
        block.forward = types.MethodType(straightforward_block_forward, block)
    return model


def straightforward(model, example):
    reference = textbook(copy.deepcopy(model))
    return lambda: reference(example)


def fused_straightforward(model, example):
    reference = textbook(fused_model(model, example.device).eval())
    return lambda: reference(example)


PATHS = {
    "straightforward": straightforward,
    **BACKENDS,
    "fused_straightforward": fused_straightforward,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["selecsls60", "resnet50"])
    parser.add_argument(
        "--paths",
        nargs="+",
        default=[
            "straightforward",
            "eager",
            "fused_straightforward",
            "fused",
            "channels_last",
            "fused_channels_last",
            "onnxruntime",
            "pruned",
            "int8",
            "pruned_int8",
        ],
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    example = torch.randn(args.batch, 3, args.size, args.size)
    calls, exactness = {}, {}
    with torch.no_grad():
        for name in args.models:
            model = create_model(name).eval()
            expected = model(example)
            for path in args.paths:
                try:
                    call = PATHS[path](model, example)
                except BackendUnavailable as exc:
                    print(f"{name}/{path}: skipped ({exc.reason})")
                    continue
                output = call()
                output = torch.as_tensor(output[0] if isinstance(output, list) else output)
                exactness[(name, path)] = relative_difference(expected, output)
                calls[(name, path)] = call
        samples = time_interleaved({f"{m}/{p}": c for (m, p), c in calls.items()}, args.warmup, args.repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n{args.size}x{args.size}, batch {args.batch}, {args.threads} threads, {args.repeats} interleaved rounds, "
        f"load average {load:.1f}"
    )
    print(f"{'model':<12}{'path':<22}{'median ms':>10}{'IQR ms':>9}{'vs eager':>10}{'rel. diff':>11}  exact")
    medians = {key: summarize(samples[f"{key[0]}/{key[1]}"]) for key in calls}
    for (name, path), summary in medians.items():
        eager = medians.get((name, "eager"))
        speedup = f"{eager['median'] / summary['median']:.3f}x" if eager else "-"
        exact = "yes" if exactness[(name, path)] <= RELATIVE_TOLERANCE else ("NO" if path in EXACT_PATHS else "n/a")
        print(
            f"{name:<12}{path:<22}{1e3 * summary['median']:>10.1f}{1e3 * summary['iqr']:>9.1f}{speedup:>10}"
            f"{exactness[(name, path)]:>11.2e}  {exact}"
        )
    selecsls_models = [m for m in args.models if m.startswith("selecsls")]
    baselines = [m for m in args.models if not m.startswith("selecsls")]
    for fast in selecsls_models:
        for base in baselines:
            for path in args.paths:
                if (fast, path) in medians and (base, path) in medians:
                    ratio = medians[(base, path)]["median"] / medians[(fast, path)]["median"]
                    print(f"{fast} vs {base} at {path}: {ratio:.2f}x faster")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {f"{m}/{p}": dict(summary=medians[(m, p)], relative_diff=exactness[(m, p)]) for (m, p) in calls},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
