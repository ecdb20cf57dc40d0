"""The package stays readable: no module over 800 lines, no function over 80, and the RL trainer
(``train/rl/``) never branches on an objective's name or mode (objectives are looked up once, in
``train/rl/objectives.py``, and used through their protocol)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_lcr"
MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 80


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_over_800_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, long


def test_no_function_over_80_lines():
    long = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}"] = lines
    assert not long, long


def test_the_trainer_never_tests_an_objectives_name_or_mode():
    names = r"""["'](rl|depo|depo-iw|kd-full|kd-sampled|sampled|full|iw|grpo|dapo|gspo|cispo|ppo)["']"""
    pattern = re.compile(rf"(objective|kd_estimator|importance|mode|algorithm|\.name)\s*(==|!=|in)\s*{names}")
    trainer = [p for p in (PACKAGE / "train" / "rl").glob("*.py") if p.name != "objectives.py"]
    hits = [f"{p.name}:{i}: {line.strip()}" for p in trainer
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert trainer and not hits, hits
