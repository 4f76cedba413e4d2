"""A real git repository in a temp dir, with a small real module to work on."""

from __future__ import annotations

import subprocess
from pathlib import Path

PRICING = '''"""Prices for a small shop."""


def total(prices: list[float], discount: float = 0.0) -> float:
    """Sum the prices and apply a fractional discount."""
    if not 0.0 <= discount < 1.0:
        raise ValueError("discount must be in [0, 1)")
    return round(sum(prices) * (1.0 - discount), 2)


def is_free(price: float) -> bool:
    return price == 0


class Cart:
    def __init__(self) -> None:
        self.items: list[float] = []

    def add(self, price: float) -> None:
        if price < 0:
            raise ValueError("negative price")
        self.items.append(price)

    def total(self) -> float:
        return total(self.items)
'''


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)
    return out.stdout


def make_repo(root: Path) -> Path:
    """A git repo with `shop/pricing.py` (a package), an empty `tests/` and one commit."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "Test")
    (root / "shop").mkdir()
    (root / "shop" / "__init__.py").write_text("")
    (root / "shop" / "pricing.py").write_text(PRICING)
    (root / "tests").mkdir()
    (root / "tests" / "__init__.py").write_text("")
    (root / "tasks.d").mkdir()
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    return root
