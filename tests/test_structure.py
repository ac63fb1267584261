"""The shape of the package: no import cycles, each pipeline a room of its own over a shared core, every
command a Hydra app, `import stage2` light, and settings only in conf/.

The import graph is read from the source with `ast`, so imports inside functions (lazy imports)
count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO

SRC = REPO / "src"
CONF = REPO / "conf"
# Sub-packages that belong to the core: what two pipelines both need lives there (or in a stage2/*.py).
CORE_PACKAGES = {"stage2.formats", "stage2.store", "stage2.handoff"}
# Commands that are a thin door into one pipeline, and the only modules outside it that may import it:
# module -> (that pipeline, why the door exists).
SHIMS = {
    "stage2.cli": ("stage2.predict", "the stage2-infer console script maps the guide's flags onto the predict app"),
    "stage2.degrade": ("stage2.train", "`python -m stage2.degrade` gives training's simulated Stage 1 errors a "
                                       "command of its own, for the demo and evaluation"),
}
COMMANDS = {            # command -> (app module, a line its `--cfg job` prints)
    "stage2.predict": ("stage2.predict.app", "checkpoint: ???"),
    "stage2.train": ("stage2.train.app", "optical_dir: null"),
    "stage2.report": ("stage2.report.app", "max_tiles: 50"),
    "stage2.evaluate": ("stage2.evaluate.app", "truth_dir: ???"),
    "stage2.degrade": ("stage2.train.degrade", "truth_dir: ???"),
    "stage2.catalog": ("stage2.catalog.app", "verbose: false"),
}


# ---------------------------------------------------------------------------- the import graph
def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body (top level, functions, branches)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from X import y`: y is a module of its own where one exists, else a name in X
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {m for m in found if m in known and m != name}


def module_files(root: Path, top: str) -> dict[str, Path]:
    return {module_name(f, root): f for f in sorted((root / top).rglob("*.py"))}


def import_graph(root: Path, top: str) -> dict[str, set[str]]:
    files = module_files(root, top)
    return {name: imported_modules(f, root, set(files)) for name, f in files.items()}


def defines_hydra_app(path: Path) -> bool:
    """Whether a module builds a Hydra app at its top level: `@hydra.main(...)` on a function, or
    `main = hydra_main(...)` (stage2.runtime's helper, whose own decorator sits inside a function)."""
    def names(node: ast.expr) -> str:
        node = node.func if isinstance(node, ast.Call) else node
        return ast.unparse(node)

    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, ast.FunctionDef) and any(names(d) == "hydra.main" for d in node.decorator_list):
            return True
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and names(node.value) == "hydra_main":
            return True
    return False


def pipelines(root: Path, top: str, core_packages: set[str]) -> dict[str, str | None]:
    """module -> its pipeline, or None for the core.

    A pipeline is a sub-package of `top` other than the core's, or a module elsewhere that is a Hydra
    app of its own (`<x>.app`, or one that builds an app: a command added as a single module).
    """
    files = module_files(root, top)
    # a folder of modules is a sub-package, with or without its __init__.py (a namespace package)
    packages = {".".join(m.split(".")[:2]) for m, f in files.items() if f.parent != root / top}
    found: dict[str, str | None] = {}
    for m, f in files.items():
        head = ".".join(m.split(".")[:2])
        if head in packages and head not in core_packages:
            found[m] = head
        elif m.endswith(".app") or defines_hydra_app(f):
            found[m] = m
        else:
            found[m] = None
    return found


def structure_violations(graph: dict[str, set[str]], pipeline: dict[str, str | None],
                         shims: dict[str, tuple[str, str]]) -> list[str]:
    """Every import that crosses a room's wall: a pipeline importing another pipeline, the core
    importing a pipeline, or a shim importing a pipeline other than its own."""
    wrong = []
    for m, targets in sorted(graph.items()):
        for t in sorted(targets):
            theirs = pipeline[t]
            if theirs is None or theirs == pipeline[m]:
                continue
            if m in shims:
                if theirs != shims[m][0]:
                    wrong.append(f"shim {m} imports {t} (pipeline {theirs}): it may import {shims[m][0]} only")
            elif pipeline[m] is None:
                wrong.append(f"core {m} imports {t} (pipeline {theirs})")
            else:
                wrong.append(f"pipeline {pipeline[m]}: {m} imports {t} (pipeline {theirs})")
    return wrong


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}          # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    g = import_graph(SRC, "stage2")
    assert {"stage2", "stage2.runtime", "stage2.predict.app", "stage2.train.app", "stage2.report.app"} <= set(g)
    return g


def test_no_import_cycles_counting_lazy_imports(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path):
    """The check above can fail: a lazy import that closes a cycle is found and printed."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n    return x\n")
    (pkg / "c.py").write_text("import os\n\n\ndef x():\n    from . import a\n    return a\n")
    g = import_graph(tmp_path, "pkg")
    assert g["pkg.a"] == {"pkg.sub.b"} and g["pkg.sub.b"] == {"pkg.c"} and g["pkg.c"] == {"pkg.a"}
    assert find_cycle(g) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None


@pytest.fixture(scope="module")
def pipeline() -> dict[str, str | None]:
    return pipelines(SRC, "stage2", CORE_PACKAGES)


def test_the_pipelines_are_the_commands_rooms(pipeline):
    found = {p for p in pipeline.values() if p}
    assert {"stage2.predict", "stage2.train", "stage2.report", "stage2.evaluate"} <= found, found
    assert not found & CORE_PACKAGES
    for command, (app, _) in COMMANDS.items():
        assert pipeline[app], f"{command}: {app} is no pipeline's"
    core = {m for m, p in pipeline.items() if p is None}
    assert {"stage2", "stage2.runtime", "stage2.tiles", "stage2.model", "stage2.checkpoint", "stage2.quality",
            "stage2.figures", "stage2.formats", "stage2.store"} <= core
    assert set(SHIMS) <= core


def test_pipelines_import_no_other_pipeline_and_the_core_imports_none(graph, pipeline):
    """For every module, lazy imports counted: a pipeline imports the core and itself; the core imports
    the core; a shim imports the core and its own pipeline."""
    wrong = structure_violations(graph, pipeline, SHIMS)
    assert not wrong, "\n".join(wrong)


def test_each_shim_is_still_a_door_into_its_pipeline(graph, pipeline):
    """The allow-list does not go stale: each shim exists and imports the pipeline it is allowed."""
    for shim, (target, why) in SHIMS.items():
        assert shim in graph, f"{shim} is gone: remove it from SHIMS ({why})"
        assert any(pipeline[t] == target for t in graph[shim]), f"{shim} no longer imports {target}"


def test_the_structure_check_sees_lazy_imports_across_rooms(tmp_path):
    """The checks above can fail: a synthetic package with one wrong import of each kind, all lazy."""
    files = {
        "__init__.py": "",
        "core.py": "def f():\n    from .b import x\n    return x\n",
        "a/__init__.py": "",
        "a/app.py": "from .. import core\n\n\ndef run():\n    from ..b.x import y\n    return y\n",
        "b/__init__.py": "",
        "b/x.py": "from ..store import s\n\ny = s\n",
        "store/__init__.py": "",
        "c/y.py": "from .. import core\n",
        "store/s.py": "from .. import core\n\n\ndef g():\n    from .. import b\n    return b\n",
        "tool.py": "from .runtime import hydra_main\n\n\ndef run(cfg):\n    from .a import app\n    return app\n"
                   "\n\nmain = hydra_main('tool', run)\n",
        "runtime.py": "def hydra_main(name, run):\n    import hydra\n\n    @hydra.main(config_name=name)\n"
                      "    def main(cfg):\n        return run(cfg)\n\n    return main\n",
        "cli.py": "def main():\n    from .a.app import run\n    from .b import x\n    return run, x\n",
    }
    for rel, text in files.items():
        (tmp_path / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / rel).write_text(text)
    pipeline = pipelines(tmp_path, "pkg", {"pkg.store"})
    assert pipeline["pkg.a.app"] == "pkg.a" and pipeline["pkg.b.x"] == "pkg.b" and pipeline["pkg.tool"] == "pkg.tool"
    assert pipeline["pkg.c.y"] == "pkg.c"                  # a folder without __init__.py is a sub-package too
    assert pipeline["pkg.store.s"] is None and pipeline["pkg.runtime"] is None and pipeline["pkg.cli"] is None
    wrong = structure_violations(import_graph(tmp_path, "pkg"), pipeline, {"pkg.cli": ("pkg.a", "a door")})
    assert wrong == ["pipeline pkg.a: pkg.a.app imports pkg.b.x (pipeline pkg.b)",
                     "shim pkg.cli imports pkg.b.x (pipeline pkg.b): it may import pkg.a only",
                     "core pkg.core imports pkg.b.x (pipeline pkg.b)",
                     "core pkg.store.s imports pkg.b (pipeline pkg.b)",
                     "pipeline pkg.tool: pkg.tool imports pkg.a.app (pipeline pkg.a)"]


def test_nothing_imports_a_command_shim(graph):
    """`__main__` modules and the command shims (SHIMS) are where imports end."""
    shims = {m for m in graph if m.endswith(".__main__")} | set(SHIMS)
    wrong = sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets if t in shims)
    assert not wrong, wrong


def test_the_lazy_public_api_names_core_modules_only(pipeline):
    import stage2

    assert not [m for m in stage2._EXPORTS.values() if pipeline.get(m)]


# ---------------------------------------------------------------------------- commands
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help_and_cfg_job(command, monkeypatch, capsys):
    """`python -m <command> --help` and `--cfg job`, through the app's own Hydra entry (in this process;
    each command's subprocess smoke test covers `python -m` itself)."""
    app, line = COMMANDS[command]
    main = importlib.import_module(app).main
    monkeypatch.setattr(sys, "argv", [command, "--help"])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "== Config ==" in out and "Powered by Hydra" in out and line in out
    assert "Override anything in the config (foo.bar=value)" in out

    monkeypatch.setattr(sys, "argv", [command, "--cfg", "job"])
    main()
    out = capsys.readouterr().out
    assert line in out.splitlines() and "verbose: false" in out.splitlines()
    assert "hydra:" not in out                      # the job's config only


def test_every_python_m_command_runs_the_app_tested_above(graph):
    for command, (app, _) in COMMANDS.items():
        shim = f"{command}.__main__" if f"{command}.__main__" in graph else command
        source = (SRC / Path(*shim.split("."))).with_suffix(".py").read_text(encoding="utf-8")
        assert app in graph[shim] and "run_then_exit(main)" in source, shim


# ---------------------------------------------------------------------------- import stage2
def test_import_stage2_is_light():
    """`import stage2` loads no torch, terratorch, omegaconf or hydra (checked in a fresh interpreter)."""
    heavy = ("torch", "terratorch", "lightning", "omegaconf", "hydra", "numpy")
    code = ("import sys, stage2\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
            "print(stage2.__version__, callable(stage2.__getattr__))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    loaded, version = r.stdout.splitlines()
    assert loaded == "[]", f"import stage2 loaded {loaded}"
    assert version.startswith("0.") and version.endswith("True")


# ---------------------------------------------------------------------------- configs and defaults
def _targets(node, where: str):
    """(where, _target_, keys the YAML sets) of every node with a `_target_`, nested ones too."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node["_target_"], sorted(k for k in node if not str(k).startswith("_"))
        for k, v in node.items():
            yield from _targets(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{where}[{i}]")


def _import_target(path: str):
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_classes_built_from_conf_have_no_python_default_for_a_yaml_key():
    """Configs are the only home of defaults: a key the YAML sets is a required argument of its class."""
    found, wrong = [], []
    for yml in sorted(CONF.rglob("*.yaml")):
        for where, target, keys in _targets(yaml.safe_load(yml.read_text(encoding="utf-8")), yml.stem):
            if not target.startswith("stage2."):
                continue          # a plugin's class (e.g. the submitit launcher) is not ours
            params = inspect.signature(_import_target(target)).parameters
            found.append(target)
            for key in keys:
                if key not in params:
                    wrong.append(f"{yml.relative_to(REPO)} {where}.{key}: {target} has no argument {key!r}")
                elif params[key].default is not inspect.Parameter.empty:
                    wrong.append(f"{yml.relative_to(REPO)} {where}.{key}: {target} defaults it to "
                                 f"{params[key].default!r} in Python")
    assert {"stage2.predict.data.TileDataModule", "stage2.predict.module.Stage2Module",
            "stage2.predict.writer.TileWriter", "stage2.train.data.PairDataModule"} <= set(found)
    assert not wrong, "\n".join(wrong)
