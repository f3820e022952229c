"""Training speed at small inputs: SelecSLS with and without the tiny-map GEMM path, vs ResNet-50.

    python benchmarks/small_map_training.py                          # 32 and 64 px at batch 128, 224 px at 16
    python benchmarks/small_map_training.py --sizes 32 --repeats 5 --json small_map.json

At 32-64 px the head's 3x3 convs run on 2x2 and 1x1 maps; the package's ``SmallMapConv2d``
trains them as one exact dense GEMM. This times one full training step (forward, backward,
Adam step) of selecsls42b with that path, of the same network with plain ``nn.Conv2d`` (the
class swapped back, same weights), and of ResNet-50, round-robin in one process, and reports
images/s and the ratios. It also times eval at batch 1, 224 px (the path is training-only, so
inference must be unchanged).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform

import torch
from torch import nn

from selecsls import create_model
from selecsls.bench.runner import summarize, time_interleaved
from selecsls.models.network import SmallMapConv2d


def plain_convs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose convs are ordinary ``nn.Conv2d`` (the network before the change)."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if type(module) is SmallMapConv2d:
            module.__class__ = nn.Conv2d
    return plain


def training_step(model: nn.Module, batch: int, size: int):
    """One Adam step on a fixed random batch (data loading excluded)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images, targets = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="selecsls42b")
    parser.add_argument("--sizes", default="32,64,224")
    parser.add_argument("--batch", type=int, default=128, help="batch at 32 and 64 px (224 px uses 16)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = create_model(args.model, num_classes=10)
    models = {
        f"{args.model}": base,
        f"{args.model} plain conv": plain_convs(base),
        "resnet50": create_model("resnet50", num_classes=10),
    }
    results = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "train": {}}
    for size in map(int, args.sizes.split(",")):
        batch = args.batch if size < 224 else 16
        steps = {name: training_step(model, batch, size) for name, model in models.items()}
        samples = time_interleaved(steps, args.warmup, args.repeats)
        rates = {name: batch / summarize(runs)["median"] for name, runs in samples.items()}
        results["train"][f"{batch}x{size}"] = rates
        print(f"training step, batch {batch} x {size}px ({args.repeats} interleaved rounds, median):")
        for name, rate in rates.items():
            print(f"  {name:<28}{rate:8.1f} img/s   {rate / rates['resnet50']:.2f}x resnet50")
    image = torch.randn(1, 3, 224, 224)
    evals = {name: models[name].eval() for name in list(models)[:2]}
    with torch.inference_mode():
        samples = time_interleaved({name: (lambda m=m: m(image)) for name, m in evals.items()}, 2, 10)
    latency = {name: summarize(runs)["median"] * 1e3 for name, runs in samples.items()}
    results["eval_b1_224_ms"] = latency
    print("eval, batch 1, 224px: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in latency.items()))
    results["load_average"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
