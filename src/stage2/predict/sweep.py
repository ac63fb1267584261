"""AOI sweeps (`python -m stage2.predict -m aoi=a,b,c`): one line per AOI and the sweep's exit code.

`SweepReport` is a Hydra Callback (configured under `hydra.callbacks` in conf/predict.yaml). Each
AOI job returns its outcome (see `stage2.predict.app.main`); `on_job_end` writes it as
`stage2_job.json` into the job's own run dir, and `on_multirun_end` reads every job's file, prints
one line per AOI and exits non-zero when any AOI failed, after all of them have run. Going through
files, not memory, is what makes it work with remote launchers too: with Hydra's submitit
launcher `on_job_end` runs on the SLURM node and `on_multirun_end` on the submitting machine.

DDP inside a sweep job is `stage2.distributed.distributed_scope`'s business.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..runtime import atomic_write_text

log = logging.getLogger("stage2")

JOB_FILE = "stage2_job.json"


def _is_multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode", default=None) == RunMode.MULTIRUN


class SweepReport(Callback):
    """One line per AOI at the end of a sweep, and a non-zero exit when any AOI failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A sweep dir can be reused (hydra.sweep.dir=fixed): forget the outcomes of earlier sweeps.
        for stale in Path(str(config.hydra.sweep.dir)).rglob(JOB_FILE):
            stale.unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        job_dir = Path(str(config.hydra.runtime.output_dir))
        outcome: dict[str, Any] = {"aoi": OmegaConf.select(config, "aoi", default=None), "code": 1}
        try:
            value = job_return.return_value       # re-raises what the task function raised
            outcome = dict(value) if isinstance(value, dict) else {**outcome, "code": int(value or 0)}
        except Exception as err:  # stage2.predict.main catches everything; this is the last net
            outcome["error"] = f"unexpected {type(err).__name__}: {err}"
        if outcome.get("rank", 0) != 0:       # SLURM tasks > 0 of a multi-GPU job: rank 0 reports
            return
        outcome.update(job_num=int(config.hydra.job.num), job_dir=str(job_dir),
                       overrides=list(job_return.overrides or []))
        job_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(job_dir / JOB_FILE, json.dumps(outcome, indent=2, default=str) + "\n")
        log.info("sweep job %d: %s", outcome["job_num"], format_line(outcome))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        outcomes = sorted((json.loads(p.read_text(encoding="utf-8")) for p in sweep_dir.rglob(JOB_FILE)),
                          key=lambda o: o.get("job_num", 0))
        if not outcomes:
            return
        failed = [o for o in outcomes if o.get("code", 1) != 0]
        lines = [f"stage2 sweep: {len(outcomes)} AOIs, {len(outcomes) - len(failed)} ok, {len(failed)} failed"
                 f"   (run dirs, logs: {sweep_dir})"]
        width = max(len(aoi_name(o)) for o in outcomes)
        lines += [f"  {aoi_name(o):<{width}}  {format_line(o)}" for o in outcomes]
        print("\n".join(lines), flush=True)     # each job's log already has its own line
        if failed:
            sys.exit(max(int(o.get("code", 1)) for o in failed))


def aoi_name(outcome: dict[str, Any]) -> str:
    """The AOI's name, or the input folder when the sweep was over input_dir."""
    aoi = outcome.get("aoi")
    return str(aoi) if aoi not in (None, "", "None") else str(outcome.get("input_dir") or "?")


def format_line(outcome: dict[str, Any]) -> str:
    """`exit 0  processed 12  failed 0  skipped 3` or `exit 2  error: ...`."""
    code = int(outcome.get("code", 1))
    head = f"exit {code}"
    if "summary" in outcome:
        s = outcome["summary"]
        return (f"{head}  processed {s['processed']}  failed {s['failed']}  skipped {s['skipped']}  "
                f"({s['output_dir']})")
    if "nothing_to_do" in outcome:
        return f"{head}  nothing to do: {outcome['nothing_to_do']} tiles already done  ({outcome.get('output_dir')})"
    return f"{head}  error: {outcome.get('error', 'no result')}"
