import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import selecsls
from selecsls.cli import main
from selecsls.data.images import open_image
from selecsls.data.transforms import build_eval_transform
from selecsls.train.evaluation import autocast_for, topk_correct
from training_fixtures import corrupt_image, make_image_folder, narrow_spec, write_image


def test_topk_counts_hits_among_the_highest_logits():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 2, 0])
    assert topk_correct(logits, targets, (1, 2, 5)) == [1, 2, 3]  # top-5 capped at 3 classes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=4)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A randomly initialised narrow (pruned-shape) model saved with ``selecsls.save``."""
    torch.manual_seed(1)
    model = selecsls.create_model(narrow_spec(), num_classes=3).eval()
    path = tmp_path_factory.mktemp("model") / "narrow.pt"
    selecsls.save(model, path)
    return model, path


def _eval(capsys, *args):
    code = main(["eval", "--workers", "0", "--json", *map(str, args)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _reference(model, paths_and_targets, img_size):
    """top-1 / loss computed image by image, independently of the batched evaluator."""
    transform = build_eval_transform(img_size)
    with torch.no_grad():
        logits = torch.cat([model(transform(open_image(p))[None]) for p, _ in paths_and_targets])
    targets = torch.tensor([t for _, t in paths_and_targets])
    top1 = 100.0 * (logits.argmax(1) == targets).float().mean().item()
    return top1, torch.nn.functional.cross_entropy(logits, targets).item()


def test_eval_numbers_match_an_image_by_image_reference(folder, saved_model, capsys):
    model, path = saved_model
    result = _eval(capsys, "--data", folder, "--checkpoint", path, "--img-size", 32, "--batch-size", 5)
    samples = selecsls.data.datasets.build_dataset(folder, "val").samples
    top1, loss = _reference(model, samples, 32)
    assert result["images"] == 12 and result["skipped"] == 0
    assert result["top1"] == pytest.approx(top1)
    assert result["top5"] == 100.0  # three classes: every target is in the top 5
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    assert result["images_per_s"] > 0
    assert (result["img_size"], result["crop_pct"], result["interpolation"]) == (32, 0.875, "bilinear")


def test_eval_skips_and_counts_a_corrupt_image(tmp_path, saved_model, capsys):
    folder = make_image_folder(tmp_path, per_class=2)
    corrupt_image(folder / "val" / "fox" / "0.jpg")
    result = _eval(capsys, "--data", folder, "--checkpoint", saved_model[1], "--img-size", 32)
    assert (result["images"], result["skipped"]) == (5, 1)
    assert result["skipped_examples"] == [str(folder / "val" / "fox" / "0.jpg")]


def test_eval_with_every_image_unreadable_is_one_clear_error(tmp_path, saved_model, capsys):
    folder = make_image_folder(tmp_path, per_class=1, splits=("val",))
    for image in (folder / "val").glob("*/*"):
        corrupt_image(image)
    assert main(["eval", "--data", str(folder), "--checkpoint", str(saved_model[1]), "--workers", "0"]) == 2
    assert "no readable validation images" in capsys.readouterr().err


def test_eval_text_output(folder, saved_model, capsys):
    assert (
        main(["eval", "--data", str(folder), "--checkpoint", str(saved_model[1]), "--img-size", "32", "--workers", "0"])
        == 0
    )
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5 100.00%" in out and "12 images at 32px" in out


@pytest.fixture(scope="module")
def named_model(tmp_path_factory):
    """A narrow model that records its class names in an order unlike the sorted folders."""
    torch.manual_seed(2)
    model = selecsls.create_model(narrow_spec(), num_classes=4).eval()
    model.card = replace(model.card, label_names=("fox", "owl", "cat", "dog"))
    path = tmp_path_factory.mktemp("named") / "named.pt"
    selecsls.save(model, path)
    return model, path


def test_eval_matches_class_folders_to_outputs_by_name(tmp_path, named_model, capsys):
    model, path = named_model
    folder = make_image_folder(tmp_path, per_class=3, splits=("train", "test"))
    shutil.rmtree(folder / "test" / "cat")  # a subset of the model's classes, in another order
    result = _eval(capsys, "--data", folder, "--checkpoint", path, "--img-size", 32)
    names = model.pretrained_cfg["label_names"]
    samples = [(p, names.index(Path(p).parent.name)) for p in sorted(map(str, (folder / "test").glob("*/*")))]
    top1, loss = _reference(model, samples, 32)
    assert result["val_data"] == str(folder / "test") and result["images"] == 6
    assert result["classes"] == ["fox", "dog"] and result["classes_matched_by"] == "name"
    assert result["top1"] == pytest.approx(top1) and result["loss"] == pytest.approx(loss, rel=1e-4)
    assert main(["eval", "--data", str(folder), "--checkpoint", str(path), "--img-size", "32", "--workers", "0"]) == 0
    assert f"val data: {folder / 'test'}; 2 classes matched by name: fox, dog" in capsys.readouterr().out


def test_eval_names_a_class_folder_the_model_does_not_know(tmp_path, named_model, capsys):
    folder = make_image_folder(tmp_path, per_class=1)
    write_image(folder / "val" / "wolf" / "0.jpg", (0, 0, 0), seed=0)
    assert main(["eval", "--data", str(folder), "--checkpoint", str(named_model[1]), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has class(es) ['wolf'] that the model does not know (it predicts fox, owl, cat, dog)" in err
    assert "\n" not in err


def test_eval_limit_scores_a_class_balanced_subset(folder, saved_model, capsys):
    result = _eval(capsys, "--data", folder, "--checkpoint", saved_model[1], "--img-size", 32, "--limit", 3)
    assert result["images"] == 3 and result["classes"] == ["cat", "dog", "fox"]
    assert result["classes_matched_by"] == "position"  # this model records no names
    assert main(["eval", "--data", str(folder), "--checkpoint", str(saved_model[1]), "--limit", "0"]) == 2
    assert "--limit must be >= 1, got 0" in capsys.readouterr().err


def test_eval_rejects_data_with_more_classes_than_the_model(tmp_path, folder, capsys):
    path = tmp_path / "two.pt"
    selecsls.save(selecsls.create_model(narrow_spec(), num_classes=2), path)
    assert main(["eval", "--data", str(folder), "--checkpoint", str(path), "--img-size", "32"]) == 2
    assert "has 3 classes but the model predicts 2" in capsys.readouterr().err


def test_eval_of_a_missing_checkpoint_is_one_clear_error(folder, tmp_path, capsys):
    assert main(["eval", "--data", str(folder), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selecsls eval: error:") and "none.pt" in err and len(err.strip().splitlines()) == 1


def test_fp16_autocast_needs_cuda():
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device; use --amp bf16 on CPU"):
        autocast_for(torch.device("cpu"), "fp16")
