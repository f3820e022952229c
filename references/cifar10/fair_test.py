"""Issue 28's fair test: how much of its own sparsity each network can remove with its outputs unchanged.

For each trained model: its BN channels, those with |gamma| below :data:`presets.THRESHOLD`
("inactive"), and those pruning actually removes ("removable"):

- selecsls42b: what ``selecsls.prune`` removes (every skip is a concatenation: an inactive channel
  goes on its own, its constant folded into 1x1 consumers);
- resnet50: Torch-Pruning's ``DependencyGraph`` with the same criterion. A residual addition ties
  the channels of a stage (every block's last BN and the projection's): such a group's channel
  goes only when every member is inactive (:func:`dependency_graph_removal`).

Per stage, MACs and parameters before and after, the output change on a seeded batch; the pruned
model is saved and scored. ``removal_figure`` draws inactive against removable channels per stage.

The published exact-pruned selecsls42b (examples/cifar10/) stands in for a sparse selecsls42b source
whose run folder is gone: it is the source with its first exact pruning applied (outputs changed by
7e-6), so its channels count against the dense spec's, and "inactive" there is the channels that
pruning removed plus those whose fused filter norm is below the threshold (a fused model has no BN).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from graph import Pending, Step
from presets import FAIR_TEST_CELLS, THRESHOLD
from steps import Study, eval_step, write_json
from torch import nn

import selecsls
from selecsls.models.compare import relative_difference

FOLDER = "fair-test"
#: The cell the published model stands in for while its source's checkpoint is not there.
STAND_IN_CELL = ("selecsls42b", "sparsity")


# ------------------------------------------------------------------------------------ the measures
def selecsls_removal(model: selecsls.SelecSLS, dense: selecsls.ModelSpec, threshold: float = THRESHOLD):
    """(per-stage counts, the pruned model) for a SelecSLS: ``selecsls.prune`` at ``threshold``.

    ``dense`` is the unpruned spec: a model that is already pruned counts the channels its pruning
    removed as inactive and removable."""
    report = selecsls.analyze_sparsity(model, threshold)
    pruned = selecsls.prune(model, threshold, max_output_change=None)
    dense_widths = {name: width for name, _, width, _ in dense.conv_layers()}
    kept = {name: width for name, _, width, _ in pruned.spec.conv_layers()}
    stages: dict[str, dict[str, int]] = {}
    for layer in report.layers:
        counts = stages.setdefault(layer.stage, dict(channels=0, inactive=0, removable=0))
        removed_before = dense_widths[layer.name] - layer.channels
        counts["channels"] += dense_widths[layer.name]
        counts["inactive"] += removed_before + int(layer.low_scale.sum())
        counts["removable"] += dense_widths[layer.name] - kept[layer.name]
    return stages, pruned


def _stage(module_name: str) -> str:
    """A torchvision ResNet's stage of a module: ``layer3.2.bn1`` -> ``layer3``; the stem's BN -> ``stem``."""
    first = module_name.split(".")[0]
    return first if first.startswith("layer") else "stem"


def dependency_graph_removal(
    model: nn.Module, example: torch.Tensor, threshold: float = THRESHOLD, keep: Sequence[str] = ()
):
    """(per-stage counts, the pruned copy) by Torch-Pruning's dependency groups: a group's channel is
    removable when every BN channel tied to it has |gamma| < ``threshold``; ``keep`` names modules whose
    outputs stay (the classifier). A group keeps at least one channel (its largest). ``model`` is not changed."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise selecsls.MissingDependency(
            "torch_pruning is needed for the fair test of resnet50: pip install 'selecsls[baseline]'"
        ) from None

    pruned = copy.deepcopy(model).eval()
    names = {module: name for name, module in pruned.named_modules()}
    stages: dict[str, dict[str, int]] = {}
    for name, module in pruned.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            counts = stages.setdefault(_stage(name), dict(channels=0, inactive=0, removable=0))
            counts["channels"] += module.num_features
            counts["inactive"] += int((module.weight.detach().abs() < threshold).sum())
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example)
    modules = dict(pruned.named_modules())
    ignored = [modules[name] for name in keep]
    plans = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d]):
        members = [item for item in group if isinstance(item.dep.target.module, nn.BatchNorm2d)]
        if not members:
            continue
        width = len(group[0].idxs)
        removable = torch.ones(width, dtype=torch.bool)
        largest = torch.zeros(width)
        for item in members:
            gamma = item.dep.target.module.weight.detach().abs()[item.idxs]
            roots = torch.as_tensor(item.root_idxs)
            removable[roots] &= gamma < threshold
            largest[roots] = torch.maximum(largest[roots], gamma)
        if removable.all():
            removable[largest.argmax()] = False
        if removable.any():
            plans.append((group[0].dep.target.module, group[0].dep.handler, removable.nonzero().flatten().tolist()))
            for item in members:
                bn = item.dep.target.module
                mask = torch.zeros(width, dtype=torch.bool)
                mask[torch.as_tensor(item.root_idxs)] = True
                stages[_stage(names[bn])]["removable"] += int((removable & mask).sum())
    for module, handler, indices in plans:
        graph.get_pruning_group(module, handler, indices).prune()
    return stages, pruned


def summary(
    model: nn.Module, pruned: nn.Module, stages: dict, size: Sequence[int], dense: nn.Module | None = None
) -> dict:
    """The fair test's numbers of one model (top-1 comes from the evaluations); MACs and parameters
    before are ``dense``'s (the unpruned architecture) where ``model`` is already pruned."""
    with torch.no_grad():
        batch = torch.randn(2, *size[1:], generator=torch.Generator().manual_seed(0))
        change = relative_difference(model.eval()(batch), pruned.eval()(batch))
    dense = model if dense is None else dense
    return dict(
        threshold=THRESHOLD,
        channels=sum(counts["channels"] for counts in stages.values()),
        gamma_below_1e_3=sum(counts["inactive"] for counts in stages.values()),
        removable_channels=sum(counts["removable"] for counts in stages.values()),
        macs=selecsls.count_macs(dense, tuple(size)),
        macs_after=selecsls.count_macs(pruned, tuple(size)),
        params=selecsls.count_params(dense),
        params_after=selecsls.count_params(pruned),
        output_change=change,
        stages=stages,
    )


# ------------------------------------------------------------------------------------ the steps
def steps(study: Study, published: Path) -> list[Step]:
    """Per cell of the 2 x 2 table: the removal (JSON + the pruned model), the source's and the pruned
    model's top-1."""
    result = []
    for (model, recipe), source in FAIR_TEST_CELLS.items():
        cell = f"{model}-{recipe}"
        folder = study.out / FOLDER
        record, pruned = folder / f"{cell}.json", folder / f"{cell}.pt"
        members = study.members(source)

        def inputs(model=model, recipe=recipe, source=source) -> tuple[Path, ...]:
            """The source run's finished files; for the sparse selecsls42b, until they exist, the published
            model (the stand-in, module docstring: replaced by the source once it is there)."""
            stand_in = (model, recipe) == STAND_IN_CELL and published.exists()
            try:
                finished = study.finished(study.source(source).name)
            except Pending:
                if stand_in:
                    return (published,)
                raise
            return (published,) if stand_in and not all(path.exists() for path in finished) else finished

        def source_file(inputs=inputs) -> Path:
            return inputs()[-1]

        def measure(outputs: Sequence[Path], model=model, recipe=recipe, source_file=source_file) -> None:
            found = measure_removal(source_file(), model, outputs[1], study.preset.img_size)
            write_json(dict(model=model, recipe=recipe, **found), outputs[0])

        def from_current_source(path: Path, key: str, source_file=source_file) -> bool:
            """``path`` exists and was made from the source the cell has now (not from the stand-in it replaced)."""
            try:
                return path.exists() and json.loads(path.read_text())[key] == str(source_file())
            except Pending:
                return False

        scored = folder / f"{cell}.source.eval.json"

        result += [
            Step(
                f"fair:{cell}",
                "fairtest",
                (record, pruned),
                measure,
                inputs,
                members,
                done=lambda record=record, check=from_current_source: check(record, "source"),
            ),
            eval_step(study, pruned, phase="fairtest", runs=members),
            replace(
                eval_step(study, source_file, phase="fairtest", target=scored, inputs=inputs, runs=members),
                done=lambda scored=scored, check=from_current_source: check(scored, "checkpoint"),
            ),
        ]
    return result


def measure_removal(source: Path, model_name: str, pruned_file: Path, img_size: int) -> dict:
    """The removal of one model file, its pruned model saved to ``pruned_file`` (selecsls.load reads it)."""
    model = selecsls.load(source).eval()
    size = (1, 3, img_size, img_size)
    dense = None
    if isinstance(model, selecsls.SelecSLS):
        stages, pruned = selecsls_removal(model, selecsls.get_spec(model_name))
        dense = selecsls.create_model(model_name, num_classes=model.card.num_classes)
    else:
        stages, pruned = dependency_graph_removal(model, torch.zeros(size), keep=("fc",))
        pruned = _as_resnet50(model, pruned)
    selecsls.save(pruned, pruned_file)
    # a fused model is already pruned: the stand-in of a source whose checkpoint is gone (module docstring)
    found = summary(model, pruned, stages, size, dense)
    return dict(source=str(source), stand_in=bool(model.card.fused), **found)


def _as_resnet50(model: nn.Module, pruned: nn.Module) -> nn.Module:
    """The Torch-Pruning result rebuilt as the package's ResNet50 of the pruned widths (it then saves,
    loads and trains like any baseline), holding the surviving weights."""
    from selecsls.models.baselines import conv_widths, narrowed_widths
    from selecsls.models.build import build

    rebuilt = build(replace(model.card, widths=narrowed_widths("resnet50", conv_widths(pruned))))
    rebuilt.load_state_dict(pruned.state_dict())
    return rebuilt.eval()


# ------------------------------------------------------------------------------------ the figure
def removal_figure(rows: Sequence[dict], path: Path) -> None:
    """Inactive (|gamma| < 1e-3) against removable channels per stage: one panel per measured model."""
    from matplotlib.figure import Figure

    measured = [row for row in rows if row.get("stages")]
    if not measured:
        return
    fig = Figure(figsize=(5.5 * len(measured), 4))
    for ax, row in zip(fig.subplots(1, len(measured), squeeze=False)[0], measured, strict=True):
        stages = list(row["stages"])
        for offset, key, color in ((-0.2, "inactive", "tab:grey"), (0.2, "removable", "tab:green")):
            values = [row["stages"][stage][key] for stage in stages]
            ax.bar([i + offset for i in range(len(stages))], values, 0.4, color=color, label=key)
        ax.plot(
            range(len(stages)), [row["stages"][s]["channels"] for s in stages], "k_", markersize=18, label="channels"
        )
        ax.set_xticks(range(len(stages)), stages, fontsize=7, rotation=30)
        title = f"{row['model']} ({row['recipe']}): {row['removable_channels']:,} removable, "
        title += f"{row['gamma_below_1e_3']:,} with |gamma| < {THRESHOLD:g}"
        ax.set(title=title, ylabel="BN channels")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with selecsls.atomic_write(path) as handle:  # a whole PNG or the previous one
        fig.savefig(handle, format="png", dpi=90)
