"""One list of sampler names: config.SCHEDULER_NAMES (cheap to import) is what the CLI offers and
what model.SCHEDULERS builds."""
from __future__ import annotations

from biomedjourney import cli, config


def _choices(parser, command: str, option: str):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if option in a.option_strings).choices


def test_cli_offers_the_config_names():
    assert cli.SCHEDULER_NAMES is config.SCHEDULER_NAMES
    assert tuple(_choices(cli._parser(), "generate", "--scheduler")) == config.SCHEDULER_NAMES
    assert config.SamplerConfig().scheduler in config.SCHEDULER_NAMES


def test_model_builds_exactly_the_named_schedulers():
    from biomedjourney.model import SCHEDULERS
    assert tuple(SCHEDULERS) == config.SCHEDULER_NAMES
