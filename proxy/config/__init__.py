"""routes.yaml + environment → a frozen, typed `Config`: the one import path for the config.

Two phases, as TensorZero does it: `document` turns the YAML text into plain data plus a
path → line map, then `validate` walks that data once and collects every issue (`checks`
holds the generic checks), so `sluicegate check` shows the whole list in one run. `model`
holds the types; `load` reads the file. Everything public is re-exported here.
"""

from proxy.config.document import MAX_YAML_VALUES
from proxy.config.load import load_config, parse_config
from proxy.config.model import (
    Budget,
    BudgetPeriod,
    ClientKey,
    Config,
    ConfigError,
    ConfigIssue,
    Cooldown,
    Outliers,
    Price,
    ResponsesMode,
    Route,
    Secret,
    ServerSettings,
    StateSettings,
    Strategy,
    StreamOptionsMode,
    Target,
    Timeouts,
    Tls,
    Upstream,
    UsageHeaders,
)

__all__ = [
    "MAX_YAML_VALUES",
    "Budget",
    "BudgetPeriod",
    "ClientKey",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "Cooldown",
    "Outliers",
    "Price",
    "ResponsesMode",
    "Route",
    "Secret",
    "ServerSettings",
    "StateSettings",
    "Strategy",
    "StreamOptionsMode",
    "Target",
    "Timeouts",
    "Tls",
    "Upstream",
    "UsageHeaders",
    "load_config",
    "parse_config",
]
