"""Test helpers shared by every test package (importable as `helpers`: pytest's pythonpath = tests)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def make_tile(path: Path, h: int = 120, w: int = 120, seed: int = 0, meta: dict | None = None,
              dtype: Any = np.float32) -> np.ndarray:
    """A smooth, field-like random opt_v1 tile in [0, 1] (and its sidecar when meta is given)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 0.5 + 0.25 * np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(4 * yy + rng.uniform(0, 6))
    arr = np.stack([base * s for s in (0.3, 0.4, 0.35, 0.9)]) + rng.normal(0, 0.02, (4, h, w))
    arr = np.clip(arr, 0, 1).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, opt_v1=arr)
    if meta is not None:
        path.with_suffix(".json").write_text(json.dumps(meta))
    return arr


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 300, module: str = "stage2.predict",
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m stage2.predict ...` the way a user types it (for what needs its own process)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def compose_predict(*overrides: str):
    """conf/predict.yaml composed with `overrides`, as `python -m stage2.predict` composes it."""
    from hydra import compose, initialize_config_dir

    from stage2 import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("predict", overrides=list(overrides))


@contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    """`mount ARGS TARGET` for the block (needs root); the test is skipped, saying why, where mount is refused."""
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"mount {' '.join(args)} was refused ({r.stderr.strip()}): this test needs root")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def remount(target: Path, options: str) -> None:
    """`mount -o remount,OPTIONS TARGET` (e.g. "ro,bind" or "size=8m")."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(target)], check=True, capture_output=True)


def console_lines(err: str) -> list[str]:
    """The lines stage2 itself printed on stderr (Lightning's INFO notes and progress bars aside)."""
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("stage2") and "tile/s" not in ln]


def compose_app(config_name: str, overrides: Sequence[str] = (), run_dir: Path | None = None,
                **values: Any) -> Any:
    """conf/<config_name>.yaml composed as `python -m stage2.<command>` composes it, ready for the
    app's `run(cfg)` in this process (no interpreter start, no torch/terratorch import per test).

    Like stage2.cli and lightning-hydra-template's `cfg_train`: compose with the `hydra` node, fill
    `hydra.runtime.output_dir` (the run dir, `run_dir`), make it the current HydraConfig (which the
    apps read for the run dir and the profile name) and return the task config without the `hydra`
    node, as @hydra.main passes it. `values` are set on the composed config afterwards (paths go in
    unparsed, as stage2-infer sets them). conftest's autouse fixture forgets the HydraConfig after
    each test.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict, read_write

    from stage2 import CONF_DIR
    from stage2.runtime import register_resolvers

    register_resolvers()          # predict.yaml's and report.yaml's ${stage2_aoi_dir:...}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with read_write(cfg), open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, str(value) if isinstance(value, Path) else value, merge=False)
        cfg.hydra.mode = RunMode.RUN
        cfg.hydra.runtime.output_dir = str((run_dir or Path.cwd()).absolute())
    HydraConfig.instance().set_config(cfg)
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def read_json(path: Path) -> Any:
    """A JSON file written by stage2 (UTF-8)."""
    return json.loads(path.read_text(encoding="utf-8"))


def read_opt_v2(path: str | Path) -> np.ndarray:
    """The opt_v2 layer of an output, through the public reader (stage2.read_output)."""
    from stage2 import read_output

    return read_output(path).layers["opt_v2"]


def write_npz_output(output_dir: str | Path, name: str, opt_v2: np.ndarray, meta: dict[str, Any]) -> Path:
    """An NPZ output written by the product's one writer, as a run writes it (the folder is created)."""
    from stage2.product import write_output
    from stage2.store import open_store

    store = open_store(output_dir)
    store.make()
    write_output(store, name, {"opt_v2": opt_v2}, meta, output_format="npz", geo=None, cog_settings=None)
    return Path(output_dir) / f"{name}.json"
