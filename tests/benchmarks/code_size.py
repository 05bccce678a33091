"""Lines of code per module and per class (non-blank, non-comment; docstrings count), for
keeping the house within DESIGN.md's limits: ``python tests/benchmarks/code_size.py``.

Prints every module of lorakit/ and plugins/ with its count and its largest class, and
flags core modules over 300 lines and classes over 200.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE_LIMIT, CLASS_LIMIT = 300, 200


def code_lines(lines: list[str]) -> int:
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def report(folders=("lorakit", "plugins")) -> int:
    over = 0
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = path.read_text().splitlines()
            classes = [
                (node.name, code_lines(lines[node.lineno - 1 : node.end_lineno]))
                for node in ast.walk(ast.parse("\n".join(lines)))
                if isinstance(node, ast.ClassDef)
            ]
            biggest = max(classes, key=lambda c: c[1], default=None)
            count = code_lines(lines)
            flag = ""
            if folder == "lorakit" and count > MODULE_LIMIT:
                flag, over = "  <-- module over 300", over + 1
            if biggest and biggest[1] > CLASS_LIMIT:
                flag, over = flag + f"  <-- class {biggest[0]} over 200", over + 1
            largest = f"  (largest class {biggest[0]}: {biggest[1]})" if biggest else ""
            print(f"{count:5d}  {path.relative_to(ROOT)}{largest}{flag}")
    return over


if __name__ == "__main__":
    sys.exit(1 if report() else 0)
