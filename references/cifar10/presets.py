"""The study as data: the presets (what every run of a budget shares) and the table of runs.

Nothing here runs anything; :mod:`study` turns a preset and its runs into the graph of steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

#: Where the ``publish`` step puts the exact-pruned model (relative to ``--publish-to``, by default the
#: repository root), with images/ beside it.
PUBLISHED_MODEL = Path("examples/cifar10/selecsls42b-pruned.safetensors")
#: The class-balanced validation subset the committed model's test re-scores (tests/test_examples.py).
PUBLISHED_CHECK_IMAGES = 1000
#: |gamma| below this marks a BN channel inactive: the pruning threshold of every step.
THRESHOLD = 1e-3


@dataclass(frozen=True)
class Preset:
    """What every training run of the study shares (the "same recipe, data, input size, steps").

    A run folder records its preset (``preset.json``); fields added later have defaults equal to what
    the earlier runs used, so those runs stay resumable."""

    img_size: int
    limit: int | None  # balanced training subset (None: all 50k)
    val_limit: int | None
    epochs: int
    batch_size: int
    finetune_epochs: int
    save_every: int
    runs: str = "cpu"  # which run list (RUN_LISTS)
    pilot_epochs: int = 0  # a pilot group's runs train this many epochs of the schedule, then one goes on
    training_options: tuple[str, ...] = ()  # e.g. the tensor cache and bf16 on a GPU
    bench_repeats: int = 15  # interleaved timed rounds of the study's latency benchmarks (3 warm-up rounds first)
    bench_options: tuple[str, ...] = ()  # more ``selecsls bench`` options (the smoke preset skips the memory measures)
    workers: int = 1  # training's decoding processes (0 with the tensor cache: nothing to decode)
    # The head-to-head's fine-tuning of a pruned model: its source run's recipe at this fraction of the
    # run's peak learning rate, no warm-up (at the peak the exact-pruned selecsls42b lost 9 points in
    # its first epoch).
    finetune_lr_factor: float = 0.1
    # The fp32 backends the exact-pruned model is timed on beside resnet50 (each model's fastest is compared).
    latency_backends: str = "eager,fused,tuned,onnxruntime,openvino"
    # The head-to-head's backends: every fp32 and int8 one that runs the network as it is.
    head_to_head_backends: str = "eager,fused,onnxruntime,openvino,int8,openvino_int8"
    # The image sizes the exact-pruned model and resnet50 are timed at.
    latency_sizes: str = "32,224,512x320"
    # The published model's size limit (the repository keeps it): fp16 weights if fp32 would pass it.
    published_mib: int = 20
    # The head-to-head's MAC targets (head_to_head.py), and whether its models are scored in int8 too.
    head_to_head_targets: tuple[str, ...] = ("exact-selecsls", "resnet-half", "resnet-quarter")
    int8: bool = True


#: The full budget: all 50,000 training and 10,000 validation images, 15 epochs of batch 32
#: (23,430 steps) per run, about 3.6 hours of one core per selecsls42b run here; pilot groups first.
FULL_BUDGET = Preset(
    img_size=32,
    limit=None,
    val_limit=None,
    epochs=15,
    batch_size=32,
    finetune_epochs=2,
    save_every=200,
    runs="full",
    pilot_epochs=2,
)
PRESETS = {
    # What the 2-core development CPU affords (selecsls42b trains at ~130 img/s at 32 px on an idle
    # one): 5,000 balanced training images (500 per class), 10 epochs of batch 32 = 1,560 steps per run.
    "cpu": Preset(img_size=32, limit=5000, val_limit=1000, epochs=10, batch_size=32, finetune_epochs=2, save_every=100),
    "full": FULL_BUDGET,
    # The full budget on one GPU: decoded once into the tensor cache (augmented on the GPU; the JPEG
    # path would starve it), bf16, channels-last; every run to the end, side by side
    # (references/cifar10/gpu_study.sh), the pilot rules choosing at the end.
    "gpu": replace(
        FULL_BUDGET,
        save_every=2000,
        pilot_epochs=0,
        training_options=("--data-cache", "{out}/tensor-cache", "--amp", "bf16", "--channels-last"),
        workers=0,
    ),
}
#: The gpu preset's every step at a toy size, on the CPU in a minute or two: the test suite runs it
#: (tests/references/test_cifar10_pipeline.py). Its benches time the eager backend only, at one size; its
#: head-to-head has one MAC target and no int8 scoring (the slowest steps at this size).
PRESETS["smoke"] = replace(
    PRESETS["gpu"],
    limit=40,
    val_limit=20,
    epochs=1,
    batch_size=8,
    finetune_epochs=1,
    save_every=5,
    bench_repeats=1,
    bench_options=("--process-memory", "none", "--memory-sizes", "32"),
    latency_backends="eager",
    head_to_head_backends="eager",
    latency_sizes="32",
    published_mib=200,  # one epoch leaves few channels inactive
    head_to_head_targets=("exact-selecsls",),
    int8=False,
)


@dataclass(frozen=True)
class Run:
    """One training run: a name, the model and the recipe settings that differ between runs.

    Runs of one ``pilot`` group first train the preset's ``pilot_epochs`` epochs of their full
    schedule; the group's rule (:data:`PILOT_RULES`) then picks the one that goes on (the others stop there)."""

    name: str
    model: str
    recipe: str
    extra: tuple[str, ...] = field(default=())
    question: str = ""
    pilot: str = ""


#: In the order they run: the candidate pruning sources first (the sparsity recipe with stronger
#: settings), then accuracy parity (one recipe for every network), then the other recipes of the
#: sparsity comparison (which also reads parity-selecsls42b, the adamw run).
RUNS = (
    Run("sparsity-strong", "selecsls42b", "sparsity", ("--lr", "3e-3", "--weight-decay", "5e-3"), "sparsity"),
    Run("sparsity-fast", "selecsls42b", "sparsity", ("--lr", "1e-2", "--weight-decay", "5e-3"), "sparsity"),
    Run("parity-selecsls42b", "selecsls42b", "adamw", question="parity"),
    Run("parity-resnet50", "resnet50", "adamw", question="parity"),
    Run("parity-selecsls60", "selecsls60", "adamw", question="parity"),
    Run("sparsity-default", "selecsls42b", "sparsity", question="sparsity"),
    Run("sparsity-sgd", "selecsls42b", "sgd", question="sparsity"),
    Run("sparsity-fast-weak-l2", "selecsls42b", "sparsity", ("--lr", "1e-2", "--weight-decay", "5e-4"), "sparsity"),
    Run("sparsity-mid", "selecsls42b", "sparsity", ("--lr", "5e-3", "--weight-decay", "5e-4"), "sparsity"),
)
#: The cpu preset's pruning sources: the one with most |gamma| < 1e-3 at its best epoch is pruned.
PRUNE_CANDIDATES = ("sparsity-strong", "sparsity-fast")

#: The full budget, in the order the hours go to them: the two pilot groups (the sparse selecsls42b
#: at the recipe's lr 1e-3 with the default and a 4x stronger L2; resnet50 with adamw and sgd),
#: then the fair test's other two cells (issue 28: each network with the other's recipe).
FULL_RUNS = (
    Run("sparse-l2-5e-4", "selecsls42b", "sparsity", question="sparsity", pilot="sparse selecsls42b"),
    Run("sparse-l2-2e-3", "selecsls42b", "sparsity", ("--weight-decay", "2e-3"), "sparsity", "sparse selecsls42b"),
    Run("resnet50-adamw", "resnet50", "adamw", question="parity", pilot="resnet50"),
    Run("resnet50-sgd", "resnet50", "sgd", question="parity", pilot="resnet50"),
    Run("resnet50-sparsity", "resnet50", "sparsity", question="sparsity"),
    Run("selecsls42b-adamw", "selecsls42b", "adamw", question="parity"),
)
RUN_LISTS = {"cpu": RUNS, "full": FULL_RUNS}

#: The fair test's cells (issue 28): (model, recipe) -> where its source comes from: a pilot group
#: (its chosen run) or a run name.
FAIR_TEST_CELLS = {
    ("selecsls42b", "sparsity"): "sparse selecsls42b",
    ("resnet50", "sparsity"): "resnet50-sparsity",
    ("selecsls42b", "adamw"): "selecsls42b-adamw",
    ("resnet50", "adamw"): "resnet50-adamw",
}


def _sparse_pilot_rank(record: dict, group_best_top1: float) -> tuple:
    """Sparsity without an accuracy cost: within 1 point of the group's best top-1, the most BN
    scales below 1e-2 (those on their way to the pruning threshold), then the smaller median scale."""
    return record["val_top1"] >= group_best_top1 - 1.0, record["gamma_below_1e-2"], -record["gamma_median"]


def _accuracy_pilot_rank(record: dict, group_best_top1: float) -> tuple:
    """The highest val top-1."""
    return (record["val_top1"],)


#: Each pilot group's rule: a sort key over a member's record at the pilot epoch (higher wins).
PILOT_RULES = {"sparse selecsls42b": _sparse_pilot_rank, "resnet50": _accuracy_pilot_rank}
