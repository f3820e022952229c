"""``selecsls prune``: remove unused (or, to a budget, the least important) channels of a checkpoint."""

from __future__ import annotations

import argparse

from selecsls._io import check_output


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prune",
        help="remove inactive channels (fused filter norm < threshold) and fold BN; --target-macs prunes to a budget",
        description=(
            "Without a target, pruning is exact: outputs are unchanged, and it repeats its tests until nothing "
            "changes, so pruning the result again removes nothing. The table says per layer why channels go: "
            "gamma~0 and filter~0 (zero output), const folded (constant output moved into 1x1 readers' biases), "
            "unread (no reader uses it). The change is measured on a seeded random "
            "batch and reported; above 1e-4 relative (a --threshold that cuts active channels) nothing is written "
            "unless --allow-output-change. With --target-macs/--target-params it removes active channels too "
            "(step 1 of 2); step 2 is fine-tuning: selecsls train --data DIR --init PRUNED.pt --output RUN"
        ),
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="model file to prune")
    p.add_argument("--model", help="architecture name when the file holds a plain state dict, e.g. selecsls60")
    p.add_argument(
        "--threshold",
        type=float,
        default=1e-3,
        help="a channel is inactive when the L2 norm of its fused filter, |gamma| / sqrt(var + eps) times its conv "
        "filter, is below this (|gamma| times the BN-normalised filter norm, about 0.6 to 8 in trained models), and "
        "unread when its weights in every reader are (default 1e-3)",
    )
    p.add_argument(
        "--allow-output-change",
        action="store_true",
        help="write the result even if it changes the outputs by more than 1e-4 relative (then fine-tune it)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--target-macs", type=float, metavar="FRACTION", help="prune further to this fraction of the MACs, e.g. 0.7"
    )
    budget.add_argument(
        "--target-params", type=float, metavar="FRACTION", help="prune further to this fraction of the parameters"
    )
    p.add_argument(
        "--output",
        "--out",
        dest="out",
        required=True,
        metavar="FILE",
        help="where the pruned model is saved (selecsls.load reads it)",
    )
    p.add_argument(
        "--img-size",
        type=int,
        help="input size for GMACs, the MACs budget and latency (default: the size the model records)",
    )
    p.add_argument("--histogram", metavar="PNG", help="also write a histogram of the fused filter norms per stage")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per model before timing (default 2)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per model, interleaved (default 10)")
    p.set_defaults(func=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    import torch

    from selecsls import analyze_sparsity, count_macs, count_params, prune, prune_to_budget, save
    from selecsls.bench.runner import size_label, summarize, time_interleaved
    from selecsls.compress.pruning import OUTPUT_TOLERANCE
    from selecsls.compress.sparsity import save_scale_histogram
    from selecsls.models.loading import load
    from selecsls.models.validation import check_img_size, check_int, check_threshold

    if args.img_size is not None:
        check_img_size(args.img_size)
    check_threshold("--threshold", args.threshold)
    check_int("--repeats", args.repeats)
    check_int("--warmup", args.warmup, low=0)
    check_output(args.out, [args.checkpoint])
    if args.histogram:
        check_output(args.histogram, [args.checkpoint, args.out])
    model = load(args.checkpoint, args.model).cpu().eval()
    # The size the model records (checked when the file was read) unless --img-size is given.
    height, width = (args.img_size, args.img_size) if args.img_size else model.card.preprocessing.input_size[1:]
    size, img_size = (1, model.in_chans, height, width), size_label(height, width)
    report = analyze_sparsity(model, args.threshold)
    budgeted = args.target_macs is not None or args.target_params is not None
    if budgeted:
        pruned = prune_to_budget(
            model, args.target_macs, args.target_params, threshold=args.threshold, input_size=size, report=report
        )
    else:
        tolerance = None if args.allow_output_change else OUTPUT_TOLERANCE
        pruned = prune(model, args.threshold, max_output_change=tolerance, report=report)
    pruned.eval()

    kept = {name: cout for name, _, cout, _ in pruned.spec.conv_layers()}
    print(report.table(kept=kept))
    budget_cut = report.total_channels - report.removed_channels - sum(kept.values())
    print(
        f"exact pruning removes {report.removed_channels} of {report.total_channels} channels in "
        f"{report.fixpoint.rounds} round(s), until nothing more can go"
        + (f"; the budget {budget_cut} more" if budgeted else "")
    )
    before, after = (count_params(model), count_macs(model, size)), (count_params(pruned), count_macs(pruned, size))
    print(f"params {before[0]:,} -> {after[0]:,} ({after[0] / before[0]:.1%})")
    print(f"GMACs@{img_size} {before[1] / 1e9:.4g} -> {after[1] / 1e9:.4g} ({after[1] / before[1]:.1%})")

    image = torch.randn(size)
    with torch.inference_mode():
        times = time_interleaved(
            {"before": lambda: model(image), "after": lambda: pruned(image)}, args.warmup, args.repeats
        )
    median = {name: summarize(runs)["median"] for name, runs in times.items()}
    print(
        f"CPU latency @{img_size}, batch 1, median of {args.repeats} interleaved runs: "
        f"{median['before'] * 1e3:.1f} ms -> {median['after'] * 1e3:.1f} ms ({median['after'] / median['before']:.2f}x)"
    )
    changed = pruned.output_change > OUTPUT_TOLERANCE
    print(
        f"outputs vs the input model on a seeded random batch: max relative change {pruned.output_change:.3g} "
        f"({'CHANGED: fine-tune next' if changed else 'exact'}; tolerance {OUTPUT_TOLERANCE:g})"
    )
    save(pruned, args.out)
    print(f"saved {args.out}")
    if args.histogram:
        save_scale_histogram(report, args.histogram)
        print(f"wrote {args.histogram}")
    if changed:
        print(f"outputs changed: fine-tune next, e.g. selecsls train --data DIR --init {args.out} --output RUN_DIR")
    elif budgeted:
        print("budget met without changing the outputs (within the tolerance): no fine-tuning needed")
    return 0
