"""Why torch.compile (inductor) slows SelecSLS on the CPU: eager vs inductor option sets, batch 1, interleaved.

    python benchmarks/inductor_settings.py                                  # selecsls60, resnet50 at 224
    python benchmarks/inductor_settings.py --models selecsls42b --size 512x320 --variants default,frozen

Each variant is ``torch.compile(model)`` compiled (on its first call) under
``torch._inductor.config.patch(...)``, so all variants live in one process and are timed
round-robin with the eager model (``selecsls.bench.runner.time_interleaved``). Not
``torch.compile(options=...)``: in torch 2.13 that silently ignores ``freezing`` (the generated
code still takes every weight as an argument). The table gives median ms, the speed-up over the
same model's eager run, the relative output difference to eager (max |diff| / max |eager|) and the
compile time. The variants test one hypothesis each:

- ``default``: what ``torch.compile(model)`` does.
- ``no_layout``: ``layout_optimization=False``. Without freezing, inductor turns convs
  channels-last and converts every 3x3 weight to that layout on every call: SelecSLS's head holds
  ~26 M 3x3 parameters (~100 MB copied per image), ResNet-50's 3x3 weights are a quarter of that.
- ``frozen``: ``freezing=True``: weights become constants, converted (and prepacked for oneDNN)
  once at compile time. Needs inference mode (no autograd), which the benchmark uses.
- ``frozen_no_layout``: both.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types

import torch
import torch._inductor.config

from selecsls import create_model
from selecsls.bench.runner import parse_size, summarize, time_interleaved
from selecsls.models.compare import relative_difference

VARIANTS = {
    "default": {},
    "no_layout": {"layout_optimization": False},
    "frozen": {"freezing": True},
    "frozen_no_layout": {"freezing": True, "layout_optimization": False},
}


def own_code(model: torch.nn.Module, tag: str):
    """``model``'s call as a function with a code object of its own. Dynamo caches compiled graphs
    per code object and reuses one whose guards pass whatever the inductor settings were: without
    this, every variant after the first would silently run the first variant's graph."""

    def forward(x):
        return model(x)

    code = forward.__code__.replace(co_name=f"forward_{tag}")
    return types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="selecsls60,resnet50")
    parser.add_argument("--size", type=parse_size, default=(224, 224), help="224 or WIDTHxHEIGHT, e.g. 512x320")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    example = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(0))
    calls, info = {}, {}
    with torch.no_grad():
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = create_model(name).eval()
            expected = model(example)
            calls[f"{name} eager"] = lambda model=model: model(example)
            for variant in args.variants.split(","):
                compiled = torch.compile(own_code(model, variant))
                start = time.perf_counter()
                with torch._inductor.config.patch(VARIANTS[variant]):
                    output = compiled(example)
                info[f"{name} {variant}"] = dict(
                    compile_s=time.perf_counter() - start,
                    relative_diff=relative_difference(expected, output),
                )
                calls[f"{name} {variant}"] = lambda compiled=compiled: compiled(example)
                print(f"compiled {name} {variant}: {info[f'{name} {variant}']}", flush=True)
        load = os.getloadavg()
        samples = time_interleaved(calls, args.warmup, args.repeats)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'model variant':<28} {'median ms':>10} {'IQR':>7} {'x eager':>8} {'rel diff':>9} {'compile s':>9}")
    rows = []
    for key, values in samples.items():
        name, variant = key.split(" ")
        stats = summarize(values)
        eager = summarize(samples[f"{name} eager"])["median"]
        extra = info.get(key, {})
        print(
            f"{key:<28} {stats['median'] * 1e3:10.1f} {stats['iqr'] * 1e3:7.1f} {eager / stats['median']:8.2f} "
            f"{extra.get('relative_diff', 0):9.1e} {extra.get('compile_s', 0):9.1f}"
        )
        rows.append(dict(model=name, variant=variant, **stats, **extra))
    print(json.dumps(dict(size=args.size, threads=args.threads, load_average=load, rows=rows)))


if __name__ == "__main__":
    main()
