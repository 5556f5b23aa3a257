"""Sweeps on Ray (`kdrun -m hydra/launcher=ray ...`) through the hydra-ray-launcher plugin, an optional extra
(`pip install "kdrun[ray]"`); its defaults are conf/hydra/launcher/ray.yaml. Each job is one Ray task running the
kdrun task as any launcher's job does, so run directories, skips, resumes, failures and the sweep's summary are
the same. What Ray needs besides: its workers' output shown whole, and the summary printed after it."""
from __future__ import annotations

import os
import shutil
import sys
import time
import warnings

RAY_LAUNCHERS = ("ray", "ray_aws")
RAY_PLUGIN = "hydra_plugins.hydra_ray_launcher"


def chosen(argv: list[str]) -> bool:
    return any(key.lstrip("+~") == "hydra/launcher" and value.strip("'\"") in RAY_LAUNCHERS
               for key, _, value in (a.partition("=") for a in argv))


def prepare(argv: list[str]) -> None:
    """For a sweep on Ray, before Hydra starts (and imports Ray, which reads its settings from the environment)."""
    if not chosen(argv):
        return
    # Ray folds lines that several workers print alike into one, later: the jobs' tables would come out torn.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if sys.stderr.isatty():  # workers write to files that Ray forwards: they would fold their lines at 80 columns
        os.environ.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    # conf/hydra/launcher/ray.yaml has the plugin config's name so that hydra/launcher=ray gets kdrun's defaults;
    # Hydra 1.3 then validates it against the plugin's schema (which it accepts) and warns that this may stop.
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/ray' is validated against ConfigStore schema")


def wait_for_worker_output(quiet_s: float = 1.0, limit_s: float = 10.0) -> None:
    """Ray forwards a worker's output to this terminal a moment after its task returned: wait until none has come
    for `quiet_s` (at most `limit_s`), so that the sweep's summary is printed after the jobs' last lines."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher  # no public hook
    except ImportError:
        return
    last = [time.monotonic()]
    dispatcher.add_handler("kdrun_wait", lambda _data: last.__setitem__(0, time.monotonic()))
    try:
        start = time.monotonic()
        while time.monotonic() - last[0] < quiet_s and time.monotonic() - start < limit_s:
            time.sleep(0.05)
    finally:
        dispatcher.remove_handler("kdrun_wait")
