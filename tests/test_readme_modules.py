"""README's module map names every module under proxy/, so it cannot go stale."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_proxy_module_is_named_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    modules = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "proxy").rglob("*.py")
        if path.name not in {"__init__.py", "__main__.py"}
    )
    assert modules  # the walk found the package
    missing = [module for module in modules if f"`{module}`" not in readme]
    assert missing == [], f"README's module tables do not name: {missing}"
