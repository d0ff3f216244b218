"""The page's ES modules and templates, read as files: every import resolves to a name the
imported module exports, every module is reached from app.js and preloaded, no module writes
HTML strings, and no template carries inline script that the Content-Security-Policy refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.web.views import page_modules

WEB = Path(__file__).resolve().parents[2] / "service" / "web"
STATIC = WEB / "static"
ENTRY = STATIC / "app.js"
IMPORT = re.compile(r'^import\s*\{([^}]*)\}\s*from\s*"([^"]+)";', re.MULTILINE)
EXPORT = re.compile(r"^export\s+(?:async\s+)?(?:function|const|class|let)\s+([\w$]+)", re.MULTILINE)
# Ways of turning a string into markup or code; the page builds nodes and sets text instead.
UNSAFE = re.compile(r"\binnerHTML\b|\bouterHTML\b|insertAdjacentHTML|document\.write|"
                    r"\beval\s*\(|new\s+Function\b|setAttribute\(\s*[\"']on")
MAX_LINES = 200


def modules() -> list[Path]:
    return [ENTRY, *sorted((STATIC / "js").glob("*.js"))]


def imports(module: Path) -> list[tuple[Path, set[str]]]:
    """The files a module imports from, and the names it takes from each."""
    found = []
    for names, target in IMPORT.findall(module.read_text()):
        assert target.startswith("./"), f"{module.name}: {target} is not a relative module"
        found.append(((module.parent / target).resolve(),
                      {n.strip() for n in names.split(",") if n.strip()}))
    return found


@pytest.mark.parametrize("module", modules(), ids=lambda p: p.name)
def test_each_import_names_an_export_of_an_existing_module(module: Path) -> None:
    text = module.read_text()
    # Everything a module uses comes through an import; a bare "import x" or require is a miss.
    assert len(re.findall(r"^import\b", text, re.MULTILINE)) == len(imports(module))
    for target, names in imports(module):
        assert target.is_file(), f"{module.name} imports {target.name}, which is missing"
        exported = set(EXPORT.findall(target.read_text()))
        assert names <= exported, f"{module.name}: {target.name} lacks {names - exported}"


@pytest.mark.parametrize("module", modules(), ids=lambda p: p.name)
def test_modules_are_small_and_never_write_html(module: Path) -> None:
    text = module.read_text()
    assert len(text.splitlines()) <= MAX_LINES, module.name
    assert not UNSAFE.findall(text), f"{module.name}: {UNSAFE.findall(text)}"
    assert '"use strict"' not in text  # modules are strict already
    assert "DOMContentLoaded" not in text  # modules run after parsing; the event may be gone


def test_every_module_is_reached_from_the_entry_and_preloaded() -> None:
    reached: set[Path] = set()
    todo = [ENTRY]
    while todo:
        module = todo.pop()
        for target, _ in imports(module):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    on_disk = set(modules()) - {ENTRY}
    assert reached == on_disk, f"unused: {on_disk - reached}"
    assert {(STATIC / name).resolve() for name in page_modules()} == reached


@pytest.mark.parametrize("template", sorted((WEB / "templates").glob("*.html")),
                         ids=lambda p: p.name)
def test_templates_have_no_inline_script_or_handlers(template: Path) -> None:
    html = template.read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.DOTALL)
    assert all("src=" in attrs and not body.strip() for attrs, body in scripts), scripts
    assert not re.findall(r"\son[a-z]+\s*=", html)  # onclick= and kin
    assert "javascript:" not in html
    assert not re.findall(r"\sstyle\s*=", html)  # style-src 'self' refuses style attributes


def test_the_base_template_loads_the_entry_as_a_module() -> None:
    html = (WEB / "templates" / "base.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts == ["<script type=\"module\" "
                       "src=\"{{ url_for('web.static', filename='app.js') }}\">"]
