"""The manual stays true: docs/options.md lists every key of conf/ with its default as the YAML states
it, the mkdocs site builds with --strict, README.md stays short, relative links resolve, and every
`python -m stage2.<app>` command in the docs composes against the real configs.

Everything is read at test time, so a key added to conf/ fails here until docs/options.md has it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from helpers import REPO

CONF = REPO / "conf"
DOCS = REPO / "docs"
README = REPO / "README.md"
OPTIONS = DOCS / "options.md"
README_MAX_LINES = 300
# Config groups whose entries share their keys: one table per group, one column per entry.
GROUP_TABLES = ("hardware", "model")
# Hydra's own config groups under conf/hydra/ (help pages, logging) hold no settings of a run; its
# launchers do (hydra.launcher.*), so they are documented.
HYDRA_DOCUMENTED = ("launcher",)
# Keys that are not settings: Hydra's own list and section, and the `_target_` wiring of run objects.
NOT_SETTINGS = {"defaults", "hydra"}
WIRING = {"_target_", "_partial_"}
APPS = ("predict", "train", "report", "evaluate", "degrade")


# ---------------------------------------------------------------------------- conf/ -> expected rows
def render(node: yaml.Node) -> str:
    """A YAML value as the file writes it: scalars verbatim (`2.0e-3`, `null`, `???`), collections in flow style."""
    if isinstance(node, yaml.ScalarNode):
        return node.value
    if isinstance(node, yaml.SequenceNode):
        return "[" + ", ".join(render(c) for c in node.value) + "]"
    return "{" + ", ".join(f"{k.value}: {render(v)}" for k, v in node.value) + "}"


def settings(path: Path) -> Iterator[tuple[str, str]]:
    """(key, default) for every setting of one YAML file: top-level keys, and `parent.child` for the
    children of a mapping, leaving out Hydra's keys, `_target_` wiring and children that only
    interpolate another key (`batch_size: ${batch_size}`)."""
    root = yaml.compose(path.read_text(encoding="utf-8"))
    if not isinstance(root, yaml.MappingNode):
        return
    for key, value in root.value:
        if key.value in NOT_SETTINGS:
            continue
        if not isinstance(value, yaml.MappingNode):
            yield key.value, render(value)
            continue
        for child, cvalue in value.value:
            if child.value in WIRING or (isinstance(cvalue, yaml.ScalarNode) and cvalue.value.startswith("${")):
                continue
            yield f"{key.value}.{child.value}", render(cvalue)


def config_files() -> list[Path]:
    """Every YAML file of conf/ documented by its own section (all but the group tables and Hydra's own)."""
    def documented(parts: tuple[str, ...]) -> bool:
        if parts[0] == "hydra":
            return len(parts) > 2 and parts[1] in HYDRA_DOCUMENTED
        return parts[0] not in GROUP_TABLES
    return sorted(p for p in CONF.rglob("*.yaml") if documented(p.relative_to(CONF).parts))


# ---------------------------------------------------------------------------- docs/options.md -> tables
def sections(text: str) -> dict[str, str]:
    """docs/options.md cut at each heading that names a `conf/...` path: path -> its text, up to the
    next heading of the same or a higher level."""
    lines = text.splitlines()
    heads = [(i, len(m.group(1)), m.group(2)) for i, line in enumerate(lines)
             if (m := re.match(r"(#+)\s+(.*)", line))]
    out = {}
    for n, (i, level, title) in enumerate(heads):
        end = next((j for j, lvl, _ in heads[n + 1:] if lvl <= level), len(lines))
        for path in re.findall(r"`(conf/[^`]+)`", title):
            out[path.rstrip("/")] = "\n".join(lines[i + 1:end])
    return out


def table_rows(section: str) -> dict[str, list[str]]:
    """Rows `| `key` | cell | ... |` of a section: key -> the other cells, stripped."""
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def header_columns(section: str) -> list[str]:
    """The entry names of a group table's header: `| key | `cpu` | `lowvr` | ... | meaning |`."""
    for line in section.splitlines():
        if line.startswith("| key |"):
            return re.findall(r"`([^`]+)`", line)
    return []


@pytest.fixture(scope="module")
def options() -> dict[str, str]:
    assert OPTIONS.exists(), "docs/options.md is missing"
    return sections(OPTIONS.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_key_of_a_config_file_is_documented_with_its_default(path: Path, options: dict[str, str]) -> None:
    name = str(path.relative_to(REPO))
    assert name in options, (f"docs/options.md has no section for {name}: add a heading naming `{name}` "
                             "and a table | `key` | `default` | meaning |")
    rows = table_rows(options[name])
    for key, default in settings(path):
        assert key in rows, f"{name}: key `{key}` is not in docs/options.md (add | `{key}` | `{default}` | ... |)"
        assert rows[key][0] == f"`{default}`", (
            f"{name}: docs/options.md gives `{key}` the default {rows[key][0]}, the YAML says `{default}`")


@pytest.mark.parametrize("group", GROUP_TABLES)
def test_every_key_of_a_config_group_is_documented_per_entry(group: str, options: dict[str, str]) -> None:
    name = f"conf/{group}"
    assert name in options, f"docs/options.md has no section naming `{name}/`"
    columns = header_columns(options[name])
    rows = table_rows(options[name])
    for path in sorted((CONF / group).glob("*.yaml")):
        assert path.stem in columns, f"docs/options.md: the `{name}/` table has no column `{path.stem}`"
        col = columns.index(path.stem)
        for key, default in settings(path):
            assert key in rows, f"{name}/{path.name}: key `{key}` is not in the docs/options.md table"
            assert rows[key][col] == f"`{default}`", (
                f"{name}/{path.name}: docs/options.md gives `{key}` {rows[key][col]}, the YAML says `{default}`")


def test_the_options_check_reads_nested_keys() -> None:
    keys = dict(settings(CONF / "predict.yaml"))
    assert {"checkpoint", "window.size", "window.overlap", "window.above", "cog.compress"} <= set(keys)
    assert not any(k.startswith(("data.", "module.", "writer.", "hydra")) for k in keys), "wiring is not a setting"


# ---------------------------------------------------------------------------- the site
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                             "--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})   # material's banner
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "index.html").exists()


def test_every_page_is_in_the_nav() -> None:
    text = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        assert re.search(rf":\s*{re.escape(page.name)}\s*$", text, re.M), f"mkdocs.yml's nav lacks {page.name}"


# ---------------------------------------------------------------------------- README
def test_readme_is_short_and_names_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}: move text to docs/"
    assert "make demo" in text and "make test" in text


# ---------------------------------------------------------------------------- links
def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def slug(text: str) -> str:
    """Python-Markdown's toc slug of a heading's text."""
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    """The ids of a page's headings: an explicit `{#id}`, else the slug of the heading's text."""
    out = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#+\s+(.*?)\s*$", line)
        if m:
            explicit = re.search(r"\{[^}]*#([\w-]+)[^}]*\}\s*$", m.group(1))
            out.add(explicit.group(1) if explicit else slug(m.group(1)))
    return out


def links(path: Path) -> Iterator[str]:
    """Targets of the markdown links of a file, outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    yield from re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files_and_anchors(path: Path) -> None:
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):        # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        assert dest.exists(), f"{path.relative_to(REPO)}: the link ({target}) points to a missing file"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{path.relative_to(REPO)}: ({target}) names no heading of {dest.name}"


# ---------------------------------------------------------------------------- examples
def commands(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(app, arguments) of every `python -m stage2.<app>` line in the fenced code blocks of a file,
    with backslash continuations joined."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            m = re.match(r"\s*python -m stage2\.(\w+)(.*)", line)
            if m and m.group(1) in APPS:
                yield m.group(1), shlex.split(m.group(2).split("#")[0])


def overrides(args: list[str]) -> list[str] | None:
    """The Hydra overrides of a documented command, or None for one that cannot compose here (a
    user's --config-dir). Hydra's own keys are left to Hydra; a sweep composes its first job."""
    if "--config-dir" in args:
        return None
    sweep = "-m" in args or "--multirun" in args
    out = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg or arg.startswith(("hydra.", "hydra/")):
            continue
        key, _, value = arg.partition("=")
        if sweep and "," in value and not value.startswith("["):
            value = value.split(",")[0]
        out.append(f"{key}={value}")
    return out


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for path in markdown_files():
        for app, args in commands(path):
            ov = overrides(args)
            if ov is not None:
                found.append((str(path.relative_to(REPO)), app, ov))
    return found


def test_the_docs_show_commands_of_every_app() -> None:
    apps = {app for _, app, _ in documented_commands()}
    assert set(APPS) <= apps, f"no documented example of {sorted(set(APPS) - apps)}"


@pytest.mark.parametrize("where,app,ovr", documented_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_documented_commands_compose_with_the_real_configs(where: str, app: str, ovr: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from stage2 import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            compose(config_name=app, overrides=ovr)
        except HydraException as e:
            pytest.fail(f"{where}: python -m stage2.{app} {' '.join(ovr)} does not compose: {e}")
