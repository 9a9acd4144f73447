"""The apps' layering: the consoles (dashboard/) read through accounts' and inference's services and
selectors; neither of those imports the consoles (no import cycle between the apps), and the
dashboard's views live in dashboard/views/ only."""

import ast

from tests.conftest import REPO


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_accounts_and_inference_never_import_the_consoles():
    offenders = {
        str(path.relative_to(REPO)): sorted(n for n in _imports(path) if n.split(".")[0] == "dashboard")
        for app in ("accounts", "inference")
        for path in (REPO / app).rglob("*.py")
    }
    assert not {path: names for path, names in offenders.items() if names}


def test_the_dashboard_pages_live_in_the_dashboard_app():
    for app in ("accounts", "inference"):
        assert not (REPO / app / "templates" / "dashboard").exists()
        assert not (REPO / app / "urls.py").exists() or app == "inference"  # the API's urls only
    assert not (REPO / "templates" / "dashboard").exists()
    views = _imports(REPO / "inference" / "views.py")
    assert "django.shortcuts" not in views and "django.template" not in views  # /metrics only: no page
