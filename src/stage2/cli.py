"""`stage2-infer`: the Stage 2 guide's command-line flags, on the same Hydra run as `python -m stage2.predict`.

Users of the guide have scripts that call `infer_stage2.py --checkpoint ... --input_dir ...
--output_dir ...`. This is the only hand-written parser in stage2: each flag becomes a Hydra
override (or, for a YAML profile, a merge into `hardware`), the config is composed with Hydra's
compose API from the package's own conf dir, and `stage2.predict.app.run(cfg)` does the rest, so
both commands give identical outputs. Like a Hydra app it creates a run dir
(`outputs/predict/<date>/<time>/`, or `hydra.run.dir=...`) holding `.hydra/` and the log.

Anything after the flags is passed on as Hydra overrides, e.g. `stage2-infer ... trainer.devices=2`
(that is also how Lightning's DDP launcher re-runs this command for ranks > 0).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from . import CONF_DIR

DESCRIPTION = """\
Refine Stage 1 tiles (opt_v1) into Stage 2 tiles (opt_v2) with a Prithvi checkpoint.
The Stage 2 guide's flags; the run is `python -m stage2.predict` with the overrides shown in [ ]."""

EPILOG = """\
flag                 default        Hydra override (python -m stage2.predict)
--checkpoint PATH    (required)     checkpoint=PATH
--input_dir DIR      (required)     input_dir=DIR
--output_dir DIR     (required)     output_dir=DIR
--config NAME|YAML   lowvr          hardware=NAME (cpu, lowvr, highvr), or a YAML profile merged into it
--batch_size N       from profile   batch_size=N (lowvr and cpu: 4, highvr: 16)
--device cuda|cpu    from profile   trainer.accelerator=gpu|cpu (lowvr, highvr: CUDA when present)
--no_amp             AMP on GPU     precision=32 (fp32; use_amp false in the output JSON)
--no_skip_existing   skip           skip_existing=false (rewrite tiles that already have outputs)
OVERRIDES ...                       any other Hydra override, e.g. trainer.devices=2 quality=false

exit codes: 0 all tiles written, 1 some tiles failed (see _stage2_failures.jsonl),
            2 run-level error (bad flag, checkpoint, folder, --device cuda without CUDA)
logs: outputs/predict/<date>/<time>/stage2_predict.log (change with hydra.run.dir=DIR)"""



def default_profile() -> str:
    """The hardware profile conf/predict.yaml's defaults list selects (the config is its only home)."""
    for entry in OmegaConf.load(CONF_DIR / "predict.yaml").defaults:
        if isinstance(entry, DictConfig) and "hardware" in entry:
            return str(entry.hardware)
    raise RuntimeError("conf/predict.yaml selects no hardware profile")


DEFAULT_PROFILE = default_profile()
# Keys a YAML profile may set: those of the default profile (every profile has the same keys).
PROFILE_KEYS = tuple(str(k) for k in OmegaConf.load(CONF_DIR / "hardware" / f"{DEFAULT_PROFILE}.yaml"))


class UsageError(Exception):
    """A flag that cannot be mapped; argparse prints it with the usage line and exits 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stage2-infer", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="stage2-infer --checkpoint PATH --input_dir DIR --output_dir DIR [options] [OVERRIDES ...]")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="Stage 2 checkpoint (.pt from stage2.save_checkpoint, or a Lightning .ckpt) [checkpoint=]")
    p.add_argument("--input_dir", required=True, metavar="DIR",
                   help="folder of Stage 1 tiles: *.npz with opt_v1, optional <stem>.json [input_dir=]")
    p.add_argument("--output_dir", required=True, metavar="DIR",
                   help="folder for opt_v2 *.npz + *.json and _stage2_summary.json [output_dir=]")
    p.add_argument("--config", default=DEFAULT_PROFILE, metavar="NAME|YAML",
                   help="hardware profile: cpu, lowvr or highvr, or a YAML file with the same keys "
                        f"({', '.join(PROFILE_KEYS)}; keys left out come from "
                        f"{DEFAULT_PROFILE}) (default: {DEFAULT_PROFILE}) [hardware=]")
    p.add_argument("--batch_size", type=_positive_int, default=None, metavar="N",
                   help="tiles per forward pass (default: the profile's, 4 on lowvr as in the guide) [batch_size=]")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda: fail (exit 2) if CUDA is missing; cpu: CPU in fp32 (default: the profile's, "
                        "CUDA when present) [trainer.accelerator=gpu|cpu]")
    p.add_argument("--no_amp", action="store_true",
                   help="fp32 instead of fp16/bf16 autocast on the GPU [precision=32]")
    p.add_argument("--no_skip_existing", action="store_true",
                   help="process tiles again even when their outputs exist [skip_existing=false]")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDES",
                   help="further Hydra overrides of conf/predict.yaml, e.g. trainer.devices=2")
    return p


def profile_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml"))


def to_overrides(args: argparse.Namespace) -> list[str]:
    """The guide's flags as Hydra overrides (paths are set on the config afterwards, unparsed)."""
    out: list[str] = []
    if not _is_yaml_profile(args.config):
        if args.config not in profile_names():
            raise UsageError(f"--config {args.config}: not a hardware profile ({', '.join(profile_names())}) "
                             "and not a YAML file")
        out.append(f"hardware={args.config}")
    if args.batch_size is not None:
        out.append(f"batch_size={args.batch_size}")
    if args.device is not None:
        out.append(f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}")
    if args.no_amp:
        out.append("precision=32")
    if args.no_skip_existing:
        out.append("skip_existing=false")
    return out + list(args.overrides)


def _is_yaml_profile(value: str) -> bool:
    """A profile name wins; anything else that names a file (or looks like YAML) is a YAML profile."""
    if value in profile_names():
        return False
    return value.endswith((".yaml", ".yml")) or Path(value).expanduser().is_file()


def load_profile(path_text: str) -> DictConfig:
    """A user's YAML hardware profile, checked against the keys of conf/hardware/*.yaml."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file (give a profile name: {', '.join(profile_names())}, "
                         "or the path of a YAML profile)")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:
        raise UsageError(f"--config {path}: not readable as YAML: {e}") from None
    if not isinstance(loaded, DictConfig):
        raise UsageError(f"--config {path}: expected a mapping of {', '.join(PROFILE_KEYS)}")
    unknown = sorted(set(loaded.keys()) - set(PROFILE_KEYS))
    if unknown:
        raise UsageError(f"--config {path}: unknown keys {', '.join(map(str, unknown))}; a hardware profile has "
                         f"{', '.join(PROFILE_KEYS)}")
    return loaded


def compose_config(args: argparse.Namespace) -> DictConfig:
    """conf/predict.yaml composed with the flags' overrides; `hydra` node included and runtime filled."""
    from hydra import compose, initialize_config_dir
    from hydra.types import RunMode

    overrides = to_overrides(args)
    profile = load_profile(args.config) if _is_yaml_profile(args.config) else None
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("predict", overrides=overrides, return_hydra_config=True)
    if profile is not None:
        cfg.hardware = OmegaConf.merge(cfg.hardware, profile)
    # Paths go straight into the config: no Hydra override grammar for spaces, commas or quotes.
    cfg.checkpoint, cfg.input_dir, cfg.output_dir = args.checkpoint, args.input_dir, args.output_dir
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.RUN
        cfg.hydra.runtime.output_dir = str(Path(cfg.hydra.run.dir).expanduser().absolute())
        if profile is not None:
            cfg.hydra.runtime.choices.hardware = str(Path(args.config).expanduser())
        # What .hydra/overrides.yaml records: every flag as the override it stands for.
        task = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
        cfg.hydra.overrides.task = [*task, f"checkpoint={args.checkpoint}", f"input_dir={args.input_dir}",
                                    f"output_dir={args.output_dir}"] + (
            [f"hardware={args.config}"] if profile is not None else [])
    return cfg


def _start_run_dir(cfg: DictConfig) -> None:
    """What a Hydra app gets before its task runs: the run dir, `.hydra/*.yaml` and the job log."""
    from hydra.core.utils import configure_log

    run_dir = Path(cfg.hydra.runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    configure_log(cfg.hydra.job_logging, cfg.hydra.verbose)
    if cfg.hydra.output_subdir is not None:       # Lightning's DDP children set it to null
        sub = run_dir / str(cfg.hydra.output_subdir)
        sub.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(_task_config(cfg), sub / "config.yaml")
        OmegaConf.save(cfg.hydra.overrides.task, sub / "overrides.yaml")


def _task_config(cfg: DictConfig) -> DictConfig:
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the guide's flags, compose the Hydra config and run; returns the exit code."""
    from hydra.core.hydra_config import HydraConfig

    from .predict.app import run

    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = compose_config(args)
    except UsageError as e:
        parser.error(str(e))          # usage line + message, exit 2
    except Exception as e:            # Hydra: unknown key, bad override, missing group option
        parser.error(f"{type(e).__name__}: {e}")
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    hydra_config.set_config(cfg)      # Lightning's DDP launcher and stage2's messages read it
    try:
        _start_run_dir(cfg)
        return run(_task_config(cfg))
    finally:
        hydra_config.cfg = previous


def console_main() -> None:
    """The `stage2-infer` console script: main(), then a fast process exit (see stage2.runtime.exit_now)."""
    from .runtime import exit_now

    try:
        code = main()
    except SystemExit as e:
        code = e.code
    exit_now(code)


if __name__ == "__main__":
    console_main()
