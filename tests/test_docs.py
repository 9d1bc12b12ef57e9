"""The reference docs say what the code does: every ``gpserve serve`` flag is in
docs/cli.md with its variable and default, every metric in docs/metrics.md."""
import argparse
import os
import re
from pathlib import Path

import pytest
from conftest import ROOT

DOCS = ROOT / "docs"


def table_rows(text: str) -> dict[str, list[str]]:
    """Each backticked name in a table row's first cell -> the row's cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows[name] = cells
    return rows


def shown(default) -> str | None:
    """How the docs write a default (None: the docs describe what stands in for it)."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, int | float):
        return f"{default:g}" if default else None
    if isinstance(default, str) and default:
        return default.replace(str(Path.home()), "~")
    return None


def test_every_serve_flag_is_in_cli_md_with_its_variable_and_default(monkeypatch):
    from gpserve.flags import add_serve_arguments
    for name in [n for n in os.environ if n.startswith("GP_")]:
        monkeypatch.delenv(name)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    rows = table_rows((DOCS / "cli.md").read_text())
    problems = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = max(action.option_strings, key=len) if action.dest != "verbose" else "-v"
        flag = action.option_strings[0] if flag.startswith("--no-") else flag
        cells = rows.get(flag)
        if cells is None:
            problems.append(f"{flag}: not in docs/cli.md")
            continue
        variable = "GP_" + action.dest.upper()
        if variable not in cells[1]:
            problems.append(f"{flag}: docs/cli.md gives {cells[1]}, not {variable}")
        want = shown(action.default)
        if want is not None and want not in cells[2]:
            problems.append(f"{flag}: docs/cli.md says the default is {cells[2]!r}; "
                            f"the code's is {want!r}")
    assert not problems, "\n".join(problems)


def test_every_metric_is_in_metrics_md():
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        pytest.skip("reads this process's own registry")
    from prometheus_client import REGISTRY

    import gpserve.metrics  # noqa: F401  (registers every metric)
    documented = (DOCS / "metrics.md").read_text()
    missing = []
    for family in REGISTRY.collect():
        if not family.name.startswith("gpserve_"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        if f"`{name}`" not in documented:
            missing.append(name)
    assert not missing, f"not in docs/metrics.md: {missing}"
