"""AOTInductor packages (``selecsls export --format aoti``) against ``selecsls.freeze`` and eager: compile time,
time to the first output in a fresh process, batch-1 latency (interleaved) and the difference to eager.

    OMP_NUM_THREADS=1 python benchmarks/aoti_package.py                          # selecsls42b, selecsls60 at 224
    OMP_NUM_THREADS=1 python benchmarks/aoti_package.py --models selecsls42b --size 512x320 --repeats 30

Each model is exported (checked within 1e-5 of eager) to a package in a temporary folder; a fresh
Python process then imports torch, loads the package with ``selecsls.deploy.aoti.load_package`` and
runs it once: that is "load to first output" (the import of torch is reported apart). The package,
the frozen model and the eager model are then timed round-robin in this process (``time_interleaved``).
Targets (issue 26): first output under 2 s, outputs within 1e-5 of eager, speed within 10% of freeze.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from selecsls import create_model, freeze
from selecsls.bench.runner import parse_size, summarize, time_interleaved
from selecsls.deploy.aoti import load_package
from selecsls.deploy.export import export_model
from selecsls.models.compare import relative_difference

FIRST_OUTPUT = """
import json, sys, time
started = time.perf_counter()
import torch
imported = time.perf_counter()
from selecsls.deploy.aoti import load_package
load_package(sys.argv[1])  # loads, then runs once on zeros
print(json.dumps({"import_torch_s": imported - started, "load_to_first_output_s": time.perf_counter() - imported}))
"""


def measure(name: str, height: int, width: int, repeats: int, folder: Path) -> dict[str, object]:
    model = create_model(name).eval()
    model.card = model.card.with_image_size(height, width)
    path = folder / f"{name}_{width}x{height}.pt2"
    started = time.perf_counter()
    export_model(model, path, "aoti")
    compile_s = time.perf_counter() - started
    child = subprocess.run([sys.executable, "-c", FIRST_OUTPUT, str(path)], capture_output=True, text=True, check=True)
    package, frozen = load_package(path), freeze(model)
    images = torch.randn(1, 3, height, width)
    with torch.inference_mode():
        expected = model(images)
        difference = {"aoti": relative_difference(expected, package(images))}
        difference["frozen"] = relative_difference(expected, frozen(images))
        calls = {"eager": lambda: model(images), "frozen": lambda: frozen(images), "aoti": lambda: package(images)}
        samples = time_interleaved(calls, warmup=2, repeats=repeats)
    median = {key: summarize(values)["median"] for key, values in samples.items()}
    return dict(
        model=name,
        size=f"{width}x{height}",
        compile_s=compile_s,
        **json.loads(child.stdout.splitlines()[-1]),
        median_ms={key: 1e3 * value for key, value in median.items()},
        aoti_over_frozen=median["aoti"] / median["frozen"],
        relative_difference_to_eager=difference,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="selecsls42b,selecsls60")
    parser.add_argument("--size", default="224", help="a side, or WIDTHxHEIGHT (default 224)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    height, width = parse_size(args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            print(json.dumps(measure(name, height, width, args.repeats, Path(folder)), indent=1))


if __name__ == "__main__":
    main()
