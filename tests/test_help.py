"""`python -m stage2.<command> --help` lists the config groups that command uses, and only those.

Hydra's default help lists every group found in conf/, whichever app asks, so predict offered
`degradation=` and `model=`, which it never reads. Each command's YAML now writes its own groups into
`hydra.help.header` (the page itself: conf/hydra/help/stage2.yaml). These tests compose every
command's config and compare the groups its defaults list chose, with all their options, to what its
`--help` prints, so the two cannot drift apart: a group added to a defaults list fails here until the
command's help lists it (the failure prints the lines to paste).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Sequence

import pytest

from helpers import run_cli

COMMANDS = {            # command -> (its config in conf/, the module of its Hydra entry)
    "stage2.predict": ("predict", "stage2.predict.app"),
    "stage2.train": ("train", "stage2.train.app"),
    "stage2.report": ("report", "stage2.report.app"),
    "stage2.evaluate": ("evaluate", "stage2.evaluate.app"),
    "stage2.degrade": ("degrade", "stage2.train.degrade"),
    "stage2.catalog": ("catalog", "stage2.catalog.app"),
}
GROUPS_TITLE = "== Configuration groups =="
GROUP_LINE = re.compile(r"^(?P<key>\S+): (?P<options>.+) \(selected: (?P<selected>\S+)\)$")

Groups = dict[str, tuple[list[str], str]]      # key a user overrides -> (every option of its group, the one chosen)


def used_groups(config: str, overrides: Sequence[str] = ()) -> Groups:
    """The config groups of conf/<config>.yaml's defaults list (Hydra's own, hydra/*, aside), keyed as a
    user overrides them (`degradation@degrade`), with every option Hydra finds for each."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stage2 import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        return {key: (sorted(loader.get_group_options(key.partition("@")[0])), str(choice))
                for key, choice in cfg.hydra.runtime.choices.items()
                if not (key == "hydra" or key.startswith("hydra/"))}


def listed_groups(help_text: str) -> Groups:
    """The groups a --help page lists under GROUPS_TITLE (none when it has no such section)."""
    if GROUPS_TITLE not in help_text:
        return {}
    section = help_text.split(GROUPS_TITLE, 1)[1].split("== Config ==", 1)[0]
    found = {}
    for line in section.splitlines():
        if m := GROUP_LINE.match(line):
            found[m["key"]] = (m["options"].split(", "), m["selected"])
    return found


def header_lines(groups: Groups) -> str:
    """What the command's `hydra.help.header` should list: the lines to paste into its YAML."""
    return "\n".join(f"{key}: {', '.join(options)} (selected: ${{hydra.runtime.choices.{key}}})"
                     for key, (options, _) in sorted(groups.items()))


def help_in_process(command: str, args: Sequence[str], monkeypatch, capsys) -> str:
    """`python -m <command> --help ARGS` through the command's Hydra entry, in this process."""
    monkeypatch.setattr(sys, "argv", [command, "--help", *args])
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(COMMANDS[command][1]).main()
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_exactly_the_groups_the_command_uses(command):
    """One subprocess per command, as a user types it."""
    r = run_cli(["--help"], module=command, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    config = COMMANDS[command][0]
    used = used_groups(config)
    assert listed_groups(r.stdout) == used, (
        f"`python -m {command} --help` must list the groups of conf/{config}.yaml's defaults "
        f"list; its hydra.help.header should read:\n{header_lines(used)}\n--- it printed:\n{r.stdout}")
    assert r.stdout.startswith(f"python -m {command} "), r.stdout[:200]       # the usage comes first
    assert (GROUPS_TITLE in r.stdout) == bool(used)
    assert "Powered by Hydra" in r.stdout and "$" not in r.stdout.split("== Config ==")[0]


def test_each_command_lists_its_own_groups_not_another_commands():
    """What the page said before: every group in conf/ for every command."""
    assert set(used_groups("predict")) == {"hardware", "trainer"}
    assert set(used_groups("train")) == {"hardware", "model", "trainer", "degradation@degrade", "recipe"}
    assert set(used_groups("degrade")) == {"degradation@degrade"}
    assert used_groups("report") == used_groups("evaluate") == {}
    assert used_groups("predict")["hardware"] == (["cpu", "highvr", "lowvr"], "lowvr")


def test_help_shows_the_option_an_override_selects(monkeypatch, capsys):
    out = help_in_process("stage2.degrade", ["degradation@degrade=family"], monkeypatch, capsys)
    assert listed_groups(out) == {"degradation@degrade": (["family", "translator"], "family")}
    out = help_in_process("stage2.degrade", [], monkeypatch, capsys)
    assert listed_groups(out)["degradation@degrade"][1] == "translator"


def test_the_check_sees_a_group_the_help_does_not_list(monkeypatch, capsys):
    """The comparison above can fail: a group appended to report's defaults is not on its page."""
    out = help_in_process("stage2.report", ["+model=prithvi_eo_tiny"], monkeypatch, capsys)
    used = used_groups("report", ["+model=prithvi_eo_tiny"])
    assert set(used) == {"model"} and listed_groups(out) == {}
    assert header_lines(used).startswith("model: prithvi_eo_tiny, ")
