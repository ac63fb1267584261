"""Several processes for one run (docs/usage.md#running): what Lightning's DDP launcher needs from a Hydra app.

Lightning splits nothing itself here (stage2's batch sampler deals whole batches to the ranks);
this module only keeps the process-level state of one run to that run:

- Lightning starts ranks > 0 by re-running `sys.argv` in Hydra's RUN mode with
  `hydra.run.dir=<HydraConfig run.dir>` (lightning.fabric.strategies.launchers.subprocess_script).
  In a sweep job (`-m aoi=a,b,c`) `sys.argv` holds the whole sweep, so every child would start the
  sweep again. For the job's duration `sys.argv` becomes this job's overrides and `hydra.run.dir`
  this job's dir: the children process the same AOI and log next to it.
- The launcher leaves `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_PORT`, ... in `os.environ` and the
  process group open. The next job of a sweep (same process) would then believe its ranks are
  started externally and wait for them forever, or talk to the last job's dead children. Both are
  undone when the run ends.
Under SLURM or torchrun the ranks are started externally; nothing here changes that.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import read_write

# Set in os.environ by Lightning's _SubprocessScriptLauncher in the launching process.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra's own command-line options that take a value; kept when a DDP child re-runs one job.
_HYDRA_VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}


def hydra_flags(argv: list[str]) -> list[str]:
    """The Hydra options of a command line (config dir/name/path), without -m and the overrides."""
    kept: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("-m", "--multirun"):
            continue
        if arg in _HYDRA_VALUE_FLAGS:
            kept += [arg, next(it, "")]
        elif arg.startswith("-"):
            kept.append(arg)
    return kept


def _in_sweep_job() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def distributed_scope() -> Iterator[None]:
    """Wrap `trainer.predict` and the gathering of counts: DDP state starts and ends with the run."""
    import torch.distributed as dist

    env_before = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    group_before = dist.is_available() and dist.is_initialized()
    argv_before, hc, dir_before = sys.argv[:], None, None
    if _in_sweep_job():
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        dir_before = hc.run.dir
        sys.argv = [sys.argv[0], *hydra_flags(sys.argv[1:]), *hc.overrides.task]
        with read_write(hc):
            hc.run.dir = hc.runtime.output_dir
    try:
        yield
    finally:
        if not group_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if hc is not None:
            sys.argv = argv_before
            with read_write(hc):
                hc.run.dir = dir_before
