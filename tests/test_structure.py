"""The shape of the package (issue 12): no import cycles, pipelines apart, every command a Hydra app,
`import stage2` light, and settings only in conf/.

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
PIPELINES = ("stage2.predict", "stage2.train", "stage2.report")
ENTRY_POINTS = ("app", "__main__")
NOT_CORE = {"stage2.cli", "stage2.evaluate", "stage2.degrade"}     # command shims over the pipelines
COMMANDS = {            # command -> (app module, a line its `--cfg job` prints)
    "stage2.predict": ("stage2.predict.app", "checkpoint: ???"),
    "stage2.train": ("stage2.train.app", "optical_dir: null"),
    "stage2.report": ("stage2.report.app", "max_tiles: 50"),
    "stage2.evaluate": ("stage2.train.evaluate", "truth_dir: ???"),
    "stage2.degrade": ("stage2.train.degrade", "truth_dir: ???"),
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


def import_graph(root: Path, top: str) -> dict[str, set[str]]:
    files = sorted((root / top).rglob("*.py"))
    known = {module_name(f, root) for f in files}
    return {module_name(f, root): imported_modules(f, root, known) for f in files}


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


def _pipeline_of(module: str) -> str | None:
    return next((p for p in PIPELINES if module == p or module.startswith(p + ".")), None)


def test_no_pipeline_imports_another_pipelines_entry_point(graph):
    wrong = sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                   if _pipeline_of(m) and _pipeline_of(t) not in (None, _pipeline_of(m))
                   and t.rpartition(".")[2] in ENTRY_POINTS)
    assert not wrong, wrong


def test_nothing_imports_a_command_shim(graph):
    """`__main__` modules, stage2-infer (cli) and the evaluate/degrade shims are where imports end."""
    shims = {m for m in graph if m.endswith(".__main__")} | NOT_CORE
    wrong = sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets if t in shims)
    assert not wrong, wrong


def test_core_modules_import_no_pipeline(graph):
    core = [m for m in graph if _pipeline_of(m) is None and m not in NOT_CORE]
    assert {"stage2", "stage2.runtime", "stage2.tiles", "stage2.model", "stage2.checkpoint"} <= set(core)
    wrong = sorted(f"{m} imports {t}" for m in core for t in graph[m] if _pipeline_of(t))
    assert not wrong, wrong
    import stage2  # the lazy public API names core modules only

    assert not [m for m in stage2._EXPORTS.values() if _pipeline_of(m)]


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
