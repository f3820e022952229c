"""CPU latency of dense vs fused vs pruned SelecSLS on a synthetic checkpoint with ~30% zero gammas.

Reproducible stand-in for a checkpoint trained with Adam + coupled L2 (no weights are downloaded):
BatchNorm statistics and affine parameters are drawn at random, then ``--zero-fraction`` of every
layer's channels get gamma = beta = 0. Prints the pruned-vs-dense output error, params, GMACs and
median latencies (interleaved runs) with ratios to dense.

    python benchmarks/prune_latency.py --model selecsls60 --img-size 512 --repeats 20
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import selecsls
from selecsls.bench.runner import summarize, time_interleaved


def synthesise_sparse_checkpoint(model: nn.Module, zero_fraction: float, seed: int) -> nn.Module:
    """Give every BatchNorm trained-looking values, with ``zero_fraction`` of its channels switched off."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            n = bn.num_features
            alive = torch.rand(n, generator=gen) >= zero_fraction
            bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
            bn.running_var.uniform_(0.5, 1.5, generator=gen)
            bn.weight.copy_(torch.where(alive, torch.rand(n, generator=gen) + 0.5, 0.0))
            bn.bias.copy_(torch.where(alive, torch.rand(n, generator=gen) - 0.5, 0.0))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="selecsls60")
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--zero-fraction", type=float, default=0.3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    dense = synthesise_sparse_checkpoint(selecsls.create_model(args.model), args.zero_fraction, args.seed)
    models = {"dense": dense, "fused": selecsls.fuse(dense).eval(), "pruned": selecsls.prune(dense).eval()}
    image = torch.randn(1, 3, args.img_size, args.img_size)
    with torch.inference_mode():
        reference = dense(image)
        for name in ("fused", "pruned"):
            error = (models[name](image) - reference).abs().max() / reference.abs().max()
            print(f"{name} vs dense: max relative output difference {error:.2e}")
        times = time_interleaved(
            {name: (lambda m=model: m(image)) for name, model in models.items()}, args.warmup, args.repeats
        )

    size = (1, 3, args.img_size, args.img_size)
    print(
        f"{args.model} @ {args.img_size}x{args.img_size}, batch 1, {torch.get_num_threads()} threads, "
        f"{args.zero_fraction:.0%} zero gammas, median of {args.repeats} interleaved runs"
    )
    print(f"{'model':<8}{'params':>13}{'GMACs':>9}{'median ms':>11}{'IQR ms':>9}{'vs dense':>10}")
    base = summarize(times["dense"])["median"]
    for name, model in models.items():
        stats = summarize(times[name])
        print(
            f"{name:<8}{selecsls.count_params(model):>13,}{selecsls.count_macs(model, size) / 1e9:>9.2f}"
            f"{stats['median'] * 1e3:>11.1f}{stats['iqr'] * 1e3:>9.1f}{stats['median'] / base:>10.2f}"
        )


if __name__ == "__main__":
    main()
