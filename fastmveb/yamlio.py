"""Safe YAML loading with YAML 1.2's float syntax: run configs (rcs/*.yaml), their command-line overrides and the
config.yaml of a run read `1e-6` as the number it means (fastmveb/config.py).

    tree = yaml_load(Path("rcs/tiny.yaml").read_text())
"""
from __future__ import annotations

import re

import yaml


class _Loader(yaml.SafeLoader):
    """safe_load with YAML 1.2's float syntax: PyYAML (YAML 1.1) reads `1e-6` (no dot, unsigned exponent)
    as a string, which would reject `optim.weight_decay=1e-6`. Tags stay the safe set (no Python objects)."""


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    """yaml.safe_load, with `1e-6` read as a float (see _Loader)."""
    return yaml.load(text, Loader=_Loader)
