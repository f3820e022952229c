"""Training cost of conv6 with and without the concatenation copy, side by side.

    python benchmarks/conv6_training.py                       # selecsls60, batch 8 at 224x224
    python benchmarks/conv6_training.py --model selecsls42b --batch 4 --size 320 --repeats 15

The package's conv6 (``selecsls.models.network.ConcatConvNormAct``) computes, in training, the sum
of per-branch 1x1 convs instead of one conv over ``torch.cat``; this script times one
training step (forward, backward) of both forms round-robin, and counts the activation
bytes each keeps for backward (exact, with saved-tensor hooks).
"""

from __future__ import annotations

import argparse
import copy

import torch
from cpu_inference_paths import textbook

from selecsls import create_model
from selecsls.bench.memory import saved_tensor_bytes
from selecsls.bench.runner import summarize, time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="selecsls60")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    package = create_model(args.model).train()
    forms = {"torch.cat + conv": textbook(copy.deepcopy(package)), "copy-free (package)": package}
    shape = (args.batch, 3, args.size, args.size)
    images, targets = torch.randn(shape), torch.randint(0, 1000, (args.batch,))

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), targets).backward()

        return run

    samples = time_interleaved({name: step(model) for name, model in forms.items()}, args.warmup, args.repeats)
    print(
        f"{args.model}, training step at batch {args.batch} x {args.size}px, {args.threads} threads, "
        f"{args.repeats} interleaved rounds"
    )
    print(f"{'form':<22}{'median s':>10}{'IQR s':>8}{'saved MiB':>11}")
    for name, model in forms.items():
        summary = summarize(samples[name])
        saved = saved_tensor_bytes(model, shape) / 2**20
        print(f"{name:<22}{summary['median']:>10.3f}{summary['iqr']:>8.3f}{saved:>11.1f}")
    cat, free = (summarize(samples[name])["median"] for name in forms)
    print(f"copy-free step time / torch.cat step time: {free / cat:.3f}")


if __name__ == "__main__":
    main()
