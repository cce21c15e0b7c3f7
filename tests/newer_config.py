"""A fastmveb version one config key newer than this one: ``views.erase_p`` (a random-erasing probability, 0 = off,
today's behaviour), for the tests that an upgrade which adds a key strands no run and dates no recorded figure.

    monkeypatch.setattr(fastmveb.config, "Config", NewerConfig)     # load_config / from_dict / defaults use it
"""
from dataclasses import dataclass, field

from fastmveb.config import Config, Range, ViewsConfig, opt


@dataclass
class NewerViews(ViewsConfig):
    erase_p: float = opt(0.0, Range(0, 1))


@dataclass
class NewerConfig(Config):
    views: NewerViews = field(default_factory=NewerViews)
