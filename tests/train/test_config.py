from dataclasses import asdict

import pytest

from selecsls.cli import build_parser
from selecsls.train.config import SettingError, TrainConfig


def test_cli_defaults_are_the_config_defaults():
    args = build_parser().parse_args(["train", "--data", "d", "--output", "o"])
    assert {k: v for k, v in vars(args).items() if k not in ("command", "func")} == asdict(TrainConfig("d", "o"))
    assert TrainConfig("d", "o").workers == 2


def test_library_errors_name_settings_and_the_cli_shows_flags():
    with pytest.raises(SettingError, match=r"^img_size must be >= 16, got 0$") as caught:
        TrainConfig("d", "o", img_size=0).validate()
    assert caught.value.spelled(lambda name: "--" + name.replace("_", "-")) == "--img-size must be >= 16, got 0"
