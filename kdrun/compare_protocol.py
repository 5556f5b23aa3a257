"""The protocol facts behind each row of `kdrun compare`: what changes the numbers besides the method, so that
rows trained under different protocols are not read as one comparison. Per row: the training augmentation,
epochs, batch size, the statistic the runs' recipe reports (best or last epoch), and the method's keys that
differ from its shipped defaults (conf/method/<name>.yaml), e.g. logit standardization's KD weight 9."""
from __future__ import annotations

import math
import numbers
from functools import lru_cache

import pandas as pd
from omegaconf import OmegaConf

from kdrun.compare_records import RECORDED_METRIC, is_missing
from kdrun.modifier_keys import MODIFIER_KEYS
from kdrun.paths import conf_dir

# column name -> the record key it shows (None: computed)
PROTOCOL_COLUMNS = {"augmentation": "augmentation", "epochs": "epochs", "batch": "batch_size",
                    "statistic": RECORDED_METRIC, "changed keys": None}
TOP_LEVEL_METHOD_KEYS = ("T", "alpha", "beta")  # a record keeps these without the `method.` prefix
STATISTIC_WORDS = {"best_acc": "best", "last_acc": "last"}
UNKNOWN = "-"  # a fact the run's record does not hold
PER_RUN = object()  # a default the YAML computes from the run (an interpolation such as the pair's weight)


@lru_cache(maxsize=None)
def method_defaults(name: str) -> dict:
    """The shipped YAML's values; an interpolation (`${teacher.name}`, a per-pair weight) depends on the run: PER_RUN,
    never counted as changed unless it belongs to a modifier that is on."""
    path = conf_dir() / "method" / f"{name}.yaml"
    if not isinstance(name, str) or not path.is_file():
        return {}
    node = OmegaConf.load(path)
    return {key: PER_RUN if OmegaConf.is_interpolation(node, key) else node[key] for key in node if key != "name"}


def same(a, b) -> bool:
    if is_missing(a) and is_missing(b):
        return True
    if isinstance(a, numbers.Number) and isinstance(b, numbers.Number) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def changed_keys(run: pd.Series) -> str:
    """`key=value` for every method key of the run that is not its method's shipped default."""
    defaults = method_defaults(run["method"])
    changed = []
    for key, default in defaults.items():
        if isinstance(default, (dict, list)) or OmegaConf.is_config(default):
            continue  # layer pairs and peer lists: shown as keys of the table when they vary
        column = key if key in TOP_LEVEL_METHOD_KEYS else f"method.{key}"
        if column not in run.index or is_missing(run[column]) or (key == "T" and standardized(run)):
            continue  # (a standardized run records base_T as its T: shown as base_T)
        if switched_on(run, key) or (default is not PER_RUN and not same(run[column], default)):
            changed.append(f"{key}={text(run[column])}")
    return " ".join(changed) or "none"


def standardized(run: pd.Series) -> bool:
    return run.get("method.logit_standardize") is True


def switched_on(run: pd.Series, key: str) -> bool:
    """A modifier's own key (LS's base_T) counts as changed while its switch is on: it then replaces T."""
    return any(key in keys and run.get(f"method.{switch}") is True for switch, keys in MODIFIER_KEYS.items())


def text(value) -> str:
    if is_missing(value):
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def protocol_of(run: pd.Series) -> dict[str, str]:
    facts = {}
    for column, key in PROTOCOL_COLUMNS.items():
        if key is None:
            facts[column] = changed_keys(run)
        else:
            value = run[key] if key in run.index else None
            facts[column] = STATISTIC_WORDS.get(value, text(value)) if key == RECORDED_METRIC else text(value)
    if facts["statistic"] == "-":  # runs recorded before the statistic was: compare's default
        facts["statistic"] = "best"
    return facts


def protocol_columns(done: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per configuration, in the order of `aggregate`'s groups; mixed values within a row joined by /."""
    if done.empty:
        return pd.DataFrame(columns=list(PROTOCOL_COLUMNS))
    facts = pd.DataFrame([protocol_of(run) for _, run in done.iterrows()], index=done.index)
    grouped = facts.groupby([done[key] for key in keys], dropna=False, sort=False)
    return grouped.agg(join_known).reset_index(drop=True)


def join_known(values: pd.Series) -> str:
    """A row's distinct values joined by /; `-` (a record from before the fact was recorded) only when no run of
    the row knows it."""
    known = [v for v in dict.fromkeys(values) if v != UNKNOWN]
    return " / ".join(known) or UNKNOWN


def differing_facts(protocol: pd.DataFrame) -> list[str]:
    """The protocol columns whose known values differ between rows (or within one)."""
    differing = []
    for column in protocol.columns:
        known = protocol[column][protocol[column] != UNKNOWN]
        if known.nunique() > 1 or known.str.contains(" / ", regex=False).any():
            differing.append(column)
    return differing
