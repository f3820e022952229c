"""Checkpoint fuzzing: hundreds of random and damaged files give the package's one-line CheckpointError
(or load correctly), never another exception and never a crash; a damaged file the package wrote never
loads with changed weights."""

import json
import random
from pathlib import Path

import pytest
import torch

import selecsls
from selecsls.cli import main
from selecsls.models.card import PAYLOAD_KEY
from selecsls.models.files import HASH_KEY, CheckpointError, read_model_file, to_payload
from sparse_models import tiny_spec


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """The kinds of file selecsls reads: a saved model (torch and safetensors) and a plain state dict."""
    folder = tmp_path_factory.mktemp("originals")
    model = selecsls.create_model(tiny_spec(), num_classes=10)
    selecsls.save(model, folder / "model.pt")
    selecsls.save(model, folder / "model.safetensors")
    torch.save(model.state_dict(), folder / "plain.pt")
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}, model


#: The ways :func:`_mutations` damages a file; bit flips and overwritten runs keep its size and structure.
TRUNCATED, BIT_FLIPS, OVERWRITTEN_RUN, SPLICED = range(4)


def _mutations(data: bytes, rng: random.Random, count: int, kinds=(TRUNCATED, BIT_FLIPS, OVERWRITTEN_RUN, SPLICED)):
    """``count`` damaged copies: truncated, bit-flipped, overwritten runs, spliced (those of ``kinds``)."""
    for _ in range(count):
        kind = rng.choice(kinds)
        if kind == TRUNCATED:
            yield data[: rng.randrange(len(data))]
        elif kind == BIT_FLIPS:
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 32)):
                position = rng.randrange(len(damaged))
                damaged[position] ^= 1 << rng.randrange(8)
            yield bytes(damaged)
        elif kind == OVERWRITTEN_RUN:
            start = rng.randrange(len(data))
            run = bytes(rng.randrange(256) for _ in range(rng.randint(1, 512)))
            yield data[:start] + run + data[start + len(run) :]
        else:
            cut = rng.randrange(len(data))
            yield data[cut:] + data[:cut]


def _wrong_descriptions(model, rng: random.Random, count: int):
    """Payloads whose JSON description has one value replaced by a value of another type or range (hand-made:
    no content hash)."""
    payload = to_payload(model)
    del payload[HASH_KEY]
    description = json.loads(payload[PAYLOAD_KEY])
    weird = [None, True, -1, 0, 10**12, 1e308, float("nan"), "x", "\x1b[31m", [], [1, 2], {}, {"a": 1}, 16385]
    paths = []

    def collect(node, path):
        paths.append(path)
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            collect(child, (*path, key))

    collect(description, ())
    for _ in range(count):
        changed = json.loads(json.dumps(description))
        path = rng.choice(paths[1:])
        node = changed
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = rng.choice(weird)
        yield {**payload, PAYLOAD_KEY: json.dumps(changed)}


def _wrong_objects():
    """Well-formed torch files holding the wrong things."""
    tensor = torch.zeros(2)
    return [
        [tensor],
        3,
        "text",
        {},
        {"state_dict": 5},
        {"state_dict": {1: tensor}},
        {"state_dict": {"stem.conv.weight": "x"}},
        {PAYLOAD_KEY: 5, "state_dict": {}},
        {PAYLOAD_KEY: "{not json", "state_dict": {}},
        {PAYLOAD_KEY: "[]", "state_dict": {"a": tensor}},
        {"baseline": "resnet50", "state_dict": {"a": tensor}},
        {"baseline": "nonexistent", "state_dict": {"a": tensor}},
        {"baseline": 7, "state_dict": {"a": tensor}},
        {"model": {"model": {"model": {}}}},
    ]


def _assert_loads_or_refuses(path):
    try:
        selecsls.load(path)
    except CheckpointError as exc:
        message = str(exc)
        assert "\n" not in message and message.isprintable(), message


def test_random_and_damaged_files_give_only_checkpoint_errors(originals, tmp_path):
    files, model = originals
    rng = random.Random(0)
    cases = []
    for name, data in files.items():
        cases += [(Path(name).suffix, damaged) for damaged in _mutations(data, rng, 80)]
    cases += [(".pt", bytes(rng.randrange(256) for _ in range(rng.randint(0, 4096)))) for _ in range(60)]
    cases += [(".safetensors", bytes(rng.randrange(256) for _ in range(rng.randint(0, 512)))) for _ in range(20)]
    cases += [(".pt", b"just some text\n" * rng.randint(0, 50)) for _ in range(5)]
    for index, (suffix, data) in enumerate(cases):
        path = tmp_path / f"case{index}{suffix}"
        path.write_bytes(data)
        _assert_loads_or_refuses(path)
        path.unlink()
    assert len(cases) >= 300


def test_descriptions_with_wrong_types_give_only_checkpoint_errors(originals, tmp_path):
    _, model = originals
    rng = random.Random(1)
    for index, payload in enumerate(_wrong_descriptions(model, rng, 120)):
        torch.save(payload, tmp_path / f"description{index}.pt")
        _assert_loads_or_refuses(tmp_path / f"description{index}.pt")
    for index, obj in enumerate(_wrong_objects()):
        torch.save(obj, tmp_path / f"object{index}.pt")
        _assert_loads_or_refuses(tmp_path / f"object{index}.pt")


# --------------------------------------------------------------------------- issue 19, part B
def test_damaged_saved_files_never_load_with_changed_weights(originals, tmp_path):
    """Of 600 randomly damaged files, 32 once loaded with silently different weights. Damage in place (bit flips,
    overwritten bytes) now has two outcomes: refused, or loaded unchanged (damage outside the content, such as a
    zip entry's padding)."""
    files, model = originals
    rng, changed, damaged = random.Random(19), [], 0
    for name in ("model.pt", "model.safetensors"):
        for index, data in enumerate(_mutations(files[name], rng, 40, (BIT_FLIPS, OVERWRITTEN_RUN))):
            path = tmp_path / f"{index}{name}"
            path.write_bytes(data)
            try:
                file = read_model_file(path)
            except CheckpointError as exc:
                damaged += str(exc).startswith("file is damaged: ")
                continue
            finally:
                path.unlink()
            same = file.card == model.card and file.state.keys() == model.state_dict().keys()
            if not (same and all(torch.equal(file.state[k], t) for k, t in model.state_dict().items())):
                changed.append(f"{name} mutation {index}")
    assert not changed, f"loaded with changed content: {changed}"
    assert damaged >= 40, "most damage to the content is reported as such"


def test_saved_files_are_verified_and_others_are_not(originals, tmp_path, capsys):
    files, _ = originals
    hashes = set()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert main(["info", str(tmp_path / name)]) == 0
        content = capsys.readouterr().out.splitlines()[1]
        if name == "plain.pt":
            assert content.startswith("content: unverified (it carries no content hash"), content
        else:
            assert content.startswith("content: verified (sha256 "), content
            hashes.add(content)
    assert len(hashes) == 1, "the hash is of the content, whichever format holds it"
