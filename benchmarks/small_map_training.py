"""Training speed at small inputs, before and after the small-map fixes, side by side with ResNet-50.

    python benchmarks/small_map_training.py                          # 32 and 64 px, batch 32
    python benchmarks/small_map_training.py --sizes 32,64,224 --batch 32 --repeats 15
    python benchmarks/small_map_training.py --layers --models selecsls42b,selecsls60,selecsls84
    python benchmarks/small_map_training.py --eval --sizes 32,224 --batch 1 --repeats 30

One training step = forward, cross-entropy, backward and the ``sparsity`` recipe's optimiser step.
Two changes make SelecSLS train fast on small inputs, and both are switched off for the "before" rows:
``SmallMapConv2d`` (3x3 head convs on 1x1/2x2 maps as one matrix product over the taps that read real
input) and the fused optimiser (one kernel per step instead of a pass over memory per operation).
ResNet-50 is timed with the per-tensor and the fused optimiser (the small-map conv does not apply to
it: its convs are plain). All models run round-robin in one process; medians of ``--repeats`` rounds.
``--layers`` instead times forward + backward of every conv whose output map is 2x2 or smaller, as
oneDNN's conv and as the product (the measurement behind ``SmallMapConv2d``'s weight-size rule),
and the optimiser step alone, per-tensor vs fused. ``--eval`` times inference of the network against
the same weights in plain ``nn.Conv2d`` layers (the product never runs in eval mode; this checks the
check costs nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
from functools import partial

import torch
from torch import nn

from selecsls import atomic_write, check_output, create_model
from selecsls.bench.runner import summarize, time_interleaved
from selecsls.models.conv import SmallMapConv2d
from selecsls.train.recipes import build_optimizer, get_recipe


def sparsity_optimizer(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    """The ``sparsity`` recipe's optimiser, fused (the package's choice on CPU) or the per-tensor loop."""
    recipe = get_recipe("sparsity")
    optimizer = build_optimizer(model, recipe, recipe.lr, recipe.weight_decay)
    for group in optimizer.param_groups:
        group["fused"] = fused
    return optimizer


def training_step(model: nn.Module, fused: bool, images: torch.Tensor, targets: torch.Tensor):
    optimizer = sparsity_optimizer(model, fused)

    def run() -> None:
        loss = nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def without_small_map_products(model: nn.Module) -> nn.Module:
    """Every SmallMapConv2d runs as the plain conv (an instance setting, so other models keep theirs)."""
    for module in model.modules():
        if isinstance(module, SmallMapConv2d):
            module.gemm_max_output_pixels = 0
    return model


def _recorder(shapes: dict, key: str):
    """A forward pre-hook that records its module's input shape (and leaves the input alone)."""

    def hook(module: nn.Module, args: tuple) -> None:
        shapes.setdefault(key, args[0].shape)

    return hook


def with_plain_convs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose SmallMapConv2d layers are plain ``nn.Conv2d`` with the same weights."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, SmallMapConv2d):
                plain = nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    bias=child.bias is not None,
                )
                plain.load_state_dict(child.state_dict())
                setattr(module, name, plain)
    return model


def eval_table(model_name: str, sizes: list[int], batch: int, warmup: int, repeats: int) -> None:
    """Inference (eval mode) of the package's network vs the same weights in plain ``nn.Conv2d`` layers."""
    print(f"{'input':<16}{'plain conv ms':>15}{'package ms':>12}{'package / plain':>17}")
    for size in sizes:
        package = create_model(model_name, num_classes=10).eval()
        plain = with_plain_convs(package)
        images = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            calls = {"plain": partial(plain, images), "package": partial(package, images)}
            samples = time_interleaved(calls, warmup, repeats)
        plain_ms, package_ms = (summarize(samples[key])["median"] * 1e3 for key in ("plain", "package"))
        print(f"{f'{size} px, batch {batch}':<16}{plain_ms:>15.2f}{package_ms:>12.2f}{package_ms / plain_ms:>16.3f}x")


def optimizer_table(models: list[str], warmup: int, repeats: int) -> None:
    """The ``sparsity`` recipe's optimiser step alone, per-tensor loop vs fused, on random gradients."""
    print(f"{'model':<12}{'params':>8}{'per-tensor ms':>15}{'fused ms':>10}{'speed-up':>10}")
    for name in models:
        model = create_model(name, num_classes=10)
        for parameter in model.parameters():
            parameter.grad = torch.randn_like(parameter)
        steps = {"loop": sparsity_optimizer(model, False).step, "fused": sparsity_optimizer(model, True).step}
        samples = time_interleaved(steps, warmup, repeats)
        loop_ms, fused_ms = (summarize(samples[key])["median"] * 1e3 for key in ("loop", "fused"))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:<12}{params:>7.1f}M{loop_ms:>15.1f}{fused_ms:>10.1f}{loop_ms / fused_ms:>9.2f}x")


def layer_table(models: list[str], sizes: list[int], batch: int, warmup: int, repeats: int) -> None:
    """Per conv on a map of at most 2x2 output pixels: forward + backward as conv and as product."""
    seen = set()
    header = f"{'model':<12}{'px':>4}  {'layer':<18}{'weight':>9}{'input':>16}"
    print(f"{header}{'conv ms':>9}{'product ms':>12}{'speed-up':>10}")
    for name in models:
        for size in sizes:
            model = create_model(name, num_classes=10).train()
            inputs: dict[str, torch.Size] = {}
            hooks = [
                module.register_forward_pre_hook(_recorder(inputs, key))
                for key, module in model.named_modules()
                if isinstance(module, SmallMapConv2d)
            ]
            model(torch.randn(batch, 3, size, size))
            for hook in hooks:
                hook.remove()
            for key, shape in inputs.items():
                conv = model.get_submodule(key)
                x = torch.randn(shape, requires_grad=True)
                signature = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, tuple(shape))
                if signature in seen or conv(x).shape[-2:].numel() > SmallMapConv2d.gemm_max_output_pixels:
                    continue
                seen.add(signature)

                def step(product: bool, conv=conv, x=x):
                    def run() -> None:
                        conv.gemm_max_output_pixels = 4 if product else 0
                        conv.gemm_min_weight_elements = 0
                        conv(x).sum().backward()

                    return run

                samples = time_interleaved({"conv": step(False), "product": step(True)}, warmup, repeats)
                conv_ms, product_ms = (summarize(samples[form])["median"] * 1e3 for form in ("conv", "product"))
                print(
                    f"{name:<12}{size:>4}  {key:<18}{conv.weight.numel() / 1e6:>8.2f}M{str(tuple(shape[1:])):>16}"
                    f"{conv_ms:>9.1f}{product_ms:>12.1f}{conv_ms / product_ms:>9.2f}x"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="selecsls42b")
    parser.add_argument("--layers", action="store_true", help="time single convs as conv vs product instead")
    parser.add_argument("--models", default="selecsls42b,selecsls60", help="with --layers: the networks to scan")
    parser.add_argument("--eval", action="store_true", help="time inference against plain convs instead")
    parser.add_argument("--sizes", default="32,64", help="comma-separated input sizes in pixels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.json:
        check_output(args.json)
    torch.set_num_threads(args.threads)
    if args.eval:
        eval_table(args.model, sizes, args.batch, args.warmup, args.repeats)
        return
    if args.layers:
        layer_table(args.models.split(","), sizes, args.batch, args.warmup, args.repeats)
        optimizer_table([*args.models.split(","), "resnet50"], args.warmup, args.repeats)
        return
    results = []
    for size in sizes:
        torch.manual_seed(0)
        images, targets = torch.randn(args.batch, 3, size, size), torch.randint(0, 10, (args.batch,))
        steps = {
            f"{args.model} before": training_step(
                without_small_map_products(create_model(args.model, num_classes=10).train()), False, images, targets
            ),
            f"{args.model}": training_step(create_model(args.model, num_classes=10).train(), True, images, targets),
            "resnet50 before": training_step(create_model("resnet50", num_classes=10).train(), False, images, targets),
            "resnet50": training_step(create_model("resnet50", num_classes=10).train(), True, images, targets),
        }
        samples = time_interleaved(steps, args.warmup, args.repeats)
        rate = {name: args.batch / summarize(times)["median"] for name, times in samples.items()}
        print(f"\n{size}x{size} px, batch {args.batch}, {args.threads} threads, {args.repeats} interleaved rounds")
        print(f"{'configuration':<24}{'images/s':>10}{'vs resnet50':>13}{'vs resnet50 before':>20}")
        for name, value in rate.items():
            print(
                f"{name:<24}{value:>10.1f}{value / rate['resnet50']:>12.2f}x{value / rate['resnet50 before']:>19.2f}x"
            )
        results.append({"size": size, "batch": args.batch, "threads": args.threads, "images_per_s": rate})
    if args.json:
        with atomic_write(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
