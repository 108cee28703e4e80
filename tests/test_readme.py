"""The README's claims against what a fresh clone does: its start commands are the ones CI runs (.ci/run, after the
CPU torch wheel), its command lines parse, and every measured figure in it is a figure of benchmarks/RESULTS.md."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from optimum_sparsesched.cli.options import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def commands(block: str) -> list[str]:
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_start_commands_are_what_ci_runs():
    start = commands(code_blocks(README.split("## Start in two commands")[1], "bash")[0])
    assert start == ['pip install -e ".[default-model]" && optimum-sparsesched compress',
                     'pip install -e ".[test]" && python -m pytest -q']
    ci = [line.strip() for line in CI.splitlines()]
    positions = [next(k for k, line in enumerate(ci) if command in line) for command in start]
    torch = next(k for k, line in enumerate(ci) if "pip install -q torch==2.13.0" in line)
    assert torch < positions[0] < positions[1]  # the CPU torch wheel first, then the two commands in order
    assert "compile" not in README.split("## Start in two commands")[1].split("###")[0].replace("compiles anything", "")


def test_the_command_lines_of_the_readme_parse():
    block = code_blocks(README.split("### The command line")[1], "bash")[0]
    lines = commands(block)
    assert len(lines) == 5
    for line in lines:
        argv = shlex.split(line.replace("...", "").replace("[", "").replace("]", ""))[1:]
        argv = [{"MODEL": "some/model", "OUT": "out", "REPO_ID": "me/model", "FILE": "f.txt"}.get(a, a) for a in argv]
        argv = [a if a != "N" and a != "K" else "2" for a in argv]
        build_parser().parse_args(argv)  # exits (SystemExit) on an option the CLI does not have


def figures(text: str) -> set[str]:
    """Measured figures of a text: decimals like 40.84 or 129.3 (not versions, arXiv ids or option values
    below 10 with one decimal), "A vs B" comparisons and durations "3 min 33 s"."""
    text = re.sub(r"arXiv \d+\.\d+", "", text)
    found = {m for m in re.findall(r"(?<![\w.=])\d+\.\d+(?![\d.])", text) if len(m.split(".")[1]) >= 2 or
             float(m) >= 10}
    found |= {n for pair in re.findall(r"(\d+) vs (\d+)", text) for n in pair}
    found |= set(re.findall(r"\d+ min \d+ s", text))
    return found


def in_results(figure: str) -> bool:
    """The figure is in RESULTS.md as written, or as a more precise number that rounds to it (772 <- 771.85)."""
    if figure in RESULTS:
        return True
    if " min " in figure:
        return False
    places = len(figure.split(".")[1]) if "." in figure else 0
    return any(round(float(n), places) == float(figure) for n in re.findall(r"\d+\.\d+|\d+", RESULTS))


def test_every_figure_of_the_readme_is_in_results():
    prose = "\n".join(line for line in README.splitlines() if not line.startswith("|"))  # the options table
    missing = sorted(f for f in figures(prose) if not in_results(f))
    assert not missing, f"README figures without a row in benchmarks/RESULTS.md: {missing}"


def test_readme_links_to_results_sections_exist():
    anchors = set(re.findall(r"RESULTS\.md#([\w-]+)", README))
    assert {"a-newcomers-first-two-commands", "block-reconstruction"} <= anchors, anchors
    titles = [re.sub(r"[^\w\- ]", "", t).strip().lower().replace(" ", "-") for t in re.findall(r"^###? (.*)$", RESULTS,
                                                                                             re.M)]
    broken = sorted(a for a in anchors if a not in titles)
    assert not broken, f"README links to RESULTS.md sections that do not exist: {broken}"
