"""CPU latency of dense vs fused vs pruned SelecSLS: a trained checkpoint, or a synthetic one with ~30% zero gammas.

Without ``--checkpoint``, a reproducible stand-in for a checkpoint trained with Adam + coupled L2
(no weights are downloaded): BatchNorm statistics and affine parameters are drawn at random, then
``--zero-fraction`` of every layer's channels get gamma = beta = 0. Prints the pruned-vs-dense output
error, params, GMACs and median latencies (interleaved runs) with ratios to dense; "fused" is the
dense model with BatchNorm folded, so pruned vs fused is what removing channels alone buys.

    python benchmarks/prune_latency.py --model selecsls60 --img-size 512 --repeats 20
    python benchmarks/prune_latency.py --checkpoint run/best.pt --img-size 32 --json latency-32.json
    python benchmarks/prune_latency.py --checkpoint run/best.pt --pruned half.pt --img-size 224
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

import selecsls
from selecsls import atomic_write, check_output
from selecsls.bench.runner import summarize, time_interleaved
from selecsls.models.compare import relative_difference


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
    parser.add_argument(
        "--checkpoint", help="a trained model file (selecsls.load reads it) instead of the synthetic one"
    )
    parser.add_argument("--threshold", type=float, default=1e-3, help="|gamma| pruning threshold (default 1e-3)")
    parser.add_argument(
        "--pruned", help="with --checkpoint: time this pruned model file instead of pruning at --threshold"
    )
    parser.add_argument("--json", help="also write the table to this JSON file")
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--zero-fraction", type=float, default=0.3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pruned and not args.checkpoint:
        parser.error("--pruned needs --checkpoint (the dense model it was pruned from)")
    if args.json:
        check_output(args.json, [args.checkpoint, args.pruned])

    torch.manual_seed(args.seed)
    if args.checkpoint:
        dense = selecsls.load(args.checkpoint).eval()
        source = f"{args.checkpoint} ({dense.spec.name})"
    else:
        dense = synthesise_sparse_checkpoint(selecsls.create_model(args.model), args.zero_fraction, args.seed)
        source = f"{args.model}, {args.zero_fraction:.0%} zero gammas"
    if args.pruned:
        pruned = selecsls.load(args.pruned)
        source += f" vs {args.pruned}"
    else:
        pruned = selecsls.prune(dense, args.threshold, max_output_change=None)
    models = {"dense": dense, "fused": selecsls.fuse(dense).eval(), "pruned": pruned.eval()}
    image = torch.randn(1, 3, args.img_size, args.img_size)
    with torch.inference_mode():
        reference = dense(image)
        for name in ("fused", "pruned"):
            error = relative_difference(reference, models[name](image))
            print(f"{name} vs dense: max relative output difference {error:.2e}")
        times = time_interleaved(
            {name: (lambda m=model: m(image)) for name, model in models.items()}, args.warmup, args.repeats
        )

    size = (1, dense.in_chans, args.img_size, args.img_size)
    print(
        f"{source} @ {args.img_size}x{args.img_size}, batch 1, {torch.get_num_threads()} threads, "
        f"threshold {args.threshold:g}, median of {args.repeats} interleaved runs"
    )
    print(f"{'model':<8}{'params':>13}{'GMACs':>9}{'median ms':>11}{'IQR ms':>9}{'vs dense':>10}")
    base = summarize(times["dense"])["median"]
    rows = {}
    for name, model in models.items():
        stats = summarize(times[name])
        rows[name] = dict(
            params=selecsls.count_params(model),
            gmacs=selecsls.count_macs(model, size) / 1e9,
            median_ms=stats["median"] * 1e3,
            iqr_ms=stats["iqr"] * 1e3,
        )
        print(
            f"{name:<8}{rows[name]['params']:>13,}{rows[name]['gmacs']:>9.4g}"
            f"{rows[name]['median_ms']:>11.2f}{rows[name]['iqr_ms']:>9.2f}{stats['median'] / base:>10.2f}"
        )
    if args.json:
        result = dict(source=source, img_size=args.img_size, threads=torch.get_num_threads(), models=rows)
        with atomic_write(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
