"""The documentation agrees with the code and with itself: the settings table is the one the
settings model renders, the README names only real settings and keeps the commands CI runs,
and every relative link (and its #anchor) leads somewhere."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from layerstream.serving.settings import LayerStreamSettings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
REGENERATE = ".venv/bin/python scripts/settings_table.py --write docs/settings.md"

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def _settings_table() -> ModuleType:
    path = ROOT / "scripts" / "settings_table.py"
    spec = importlib.util.spec_from_file_location("settings_table", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(path: Path) -> str:
    """The file without its code blocks (a link-like string in code is not a link)."""
    return FENCE.sub("", path.read_text())


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in _prose(path).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            title = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            found.add(title.replace(" ", "-"))
    return found


def test_settings_table_is_rendered_from_the_settings_model():
    doc = ROOT / "docs" / "settings.md"
    text = doc.read_text()
    assert text == _settings_table().render_into(text), (
        "docs/settings.md differs from the field descriptions of LayerStreamSettings "
        f"(runtime/layerstream/serving/settings.py); regenerate it: {REGENERATE}"
    )


def test_settings_table_lists_every_setting_with_its_default():
    table = _settings_table().settings_table()
    for name, field in LayerStreamSettings.model_fields.items():
        assert f"| `{name}` |" in table
        assert field.description, f"setting {name} has no description to document it by"
    assert "| `read_ahead` | integer 0–64 or `auto` | `auto` |" in table
    assert "| `chunk_store` | string | required |" in table
    assert "| `cache_size` | bytes: `8MiB`, `2GB`, `1048576` | `10GiB` |" in table


def test_readme_settings_are_real_settings():
    section = _section(README.read_text(), "Settings that matter most")
    named = re.findall(r"^- `(\w+)`", section, re.M)
    assert len(named) >= 5, "the README's settings list is a bullet list of `name`: meaning"
    fields = set(LayerStreamSettings.model_fields)
    unknown = [name for name in named if name not in fields]
    assert not unknown, f"README names settings that do not exist: {unknown}"
    assert "docs/settings.md" in section


def test_readme_keeps_the_commands_ci_runs():
    quick_start = _section(README.read_text(), "Quick start")
    commands = re.findall(r"^(scripts/\S+)", quick_start, re.M)
    assert commands == ["scripts/serve.sh", "scripts/test.sh"]
    for command in commands:
        assert (ROOT / command).is_file()
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^scripts/test\.sh\b", ci, re.M), ".ci/run must run the README's test command"


def test_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 200, "move detail into docs/ and link it"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_lead_to_existing_files_and_headings(path: Path):
    broken = []
    for target in LINK.findall(_prose(path)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no heading with that id)")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def _modules_in_design_tree() -> set[str]:
    """The modules docs/design.md lists under "How it is built", as package/module.py."""
    text = (ROOT / "docs" / "design.md").read_text()
    tree = text[text.index("```\nruntime/layerstream/") :]
    tree = tree[: tree.index("\n```", 4)]
    listed: set[str] = set()
    packages: list[tuple[int, str]] = []  # (indent, name) of the packages above a line
    for line in tree.splitlines()[2:]:
        if not line.startswith(" "):  # the next top-level folder: the package's tree ended
            break
        if match := re.match(r"( {2,8})(\w+)/ ", line):
            indent = len(match.group(1))
            packages = [p for p in packages if p[0] < indent] + [(indent, match.group(2))]
        elif match := re.match(r"( {2,8})(\w+\.py) ", line):
            indent = len(match.group(1))
            above = [name for at, name in packages if at < indent]
            listed.add("/".join([*above, match.group(2)]))
    return listed


def test_design_lists_every_module_of_the_package():
    package = ROOT / "runtime" / "layerstream"
    actual = {
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if path.name != "__init__.py" or path.parent == package
    }
    listed = _modules_in_design_tree()
    assert actual == listed, (
        "docs/design.md's 'How it is built' is out of date: "
        f"not listed {sorted(actual - listed)}, listed but gone {sorted(listed - actual)}"
    )
