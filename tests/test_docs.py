"""The README and the docs pages: every relative link resolves, the generated results are up to date, every config
group and option is in a docs table, every path cited exists, and package docstrings list the modules there."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import results

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def links(page: Path) -> list[str]:
    """The markdown link and image targets of a page, code blocks and inline code left out."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))
    return LINK.findall(text)


def test_every_relative_link_points_at_a_file() -> None:
    assert len(PAGES) > 2, "the docs pages are missing"
    broken, seen = [], 0
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # http(s), mailto; an anchor
                continue
            seen += 1
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert seen > 50 and not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(REPO / t.split("#")[0]).resolve() for t in links(REPO / "README.md") if not t.startswith("http")}
    assert {p.resolve() for p in PAGES[1:]} <= linked


def test_the_committed_results_are_rendered_from_the_record(tmp_path: Path) -> None:
    """`python tools/results.py` (no runs: the record alone) reproduces the README and docs/results.md."""
    (tmp_path / "docs").mkdir()
    for name in ("README.md", "docs/results.md", "docs/results.json"):
        shutil.copyfile(REPO / name, tmp_path / name)
    results.main(["--readme", str(tmp_path / "README.md"), "--record", str(tmp_path / "docs" / "results.json"),
                  "--figures", str(tmp_path / "docs" / "figures")])
    for name in ("README.md", "docs/results.md", "docs/results.json"):
        assert (tmp_path / name).read_text() == (REPO / name).read_text(), f"{name}: run python tools/results.py"


def test_the_docs_folder_holds_pages_and_each_run_its_short_named_figures() -> None:
    """docs/: the pages and the record; the overview plot in docs/figures/, each run's figures in docs/figures/runs/,
    named after the recipe's short label and the protocol; the README's headline table at most six columns."""
    assert not list((REPO / "docs").glob("*.png"))
    runs = json.loads((REPO / "docs" / "results.json").read_text())["runs"]
    figures = [Path(f) for r in runs for f in r["figures"].values()]
    assert all(f.parent == Path("docs/figures/runs") and len(f.name) < 80 for f in figures)
    assert {f.name for f in figures} == {f.name for f in (REPO / "docs" / "figures" / "runs").iterdir()}
    assert all(len(r["recipe"]) <= results.MAX_LABEL and r["description"] for r in runs)
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(results.BEGIN):readme.index(results.END)]
    header = next(line for line in section.splitlines() if line.startswith("| recipe |"))
    assert header.count("|") - 1 <= 6


# --- the docs hold what conf/ and the package hold -------------------------------------------------------------

CONF = REPO / "conf"
PACKAGE = REPO / "src" / "histoflow"
GROUP_TABLE = "| group | options |"
CITED_DOC = re.compile(r"(?<![\w/.])((?:docs|conf|tools|benchmarks|tests)/[\w./-]*\w\.(?:md|yaml|py|json|png))")
CITED_MODULE = re.compile(r"(?<![\w/.-])((?:[a-z_]+/)+[a-z_0-9]+\.py)\b")
PACKAGES = sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))
EXAMPLES = {"conf/data/mine.yaml"}  # a user's own config, named as an example of where one goes


def group_tables() -> dict[str, str]:
    """group -> the text of its rows in the docs' `| group | options |` tables."""
    rows: dict[str, str] = {}
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != GROUP_TABLE:
                continue
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cell, _, rest = row[1:].partition("|")
                rows[cell.strip().strip("`")] = rows.get(cell.strip().strip("`"), "") + rest
    return rows


def test_every_config_group_and_option_is_in_a_docs_group_table() -> None:
    rows = group_tables()
    assert rows, f"no `{GROUP_TABLE}` table in the docs"
    missing = [f"{folder.relative_to(CONF).as_posix()}={option.stem}" for folder in sorted(CONF.rglob("*"))
               if folder.is_dir() for option in sorted(folder.glob("*.yaml"))
               if f"`{option.stem}`" not in rows.get(folder.relative_to(CONF).as_posix(), "")]
    assert missing == [], f"config options no `{GROUP_TABLE}` table names (docs/training.md): {missing}"


def cited(pattern: re.Pattern[str], files: list[Path]) -> list[tuple[Path, str]]:
    return [(f, m) for f in files for m in pattern.findall(f.read_text())]


def test_every_path_cited_in_conf_and_docs_exists() -> None:
    """docs/x.md, conf/..., tools/... named in a config's comments or a page's text exist; so do the module paths
    (features/bags.py, slides/tiles.py) they cite, under src/histoflow/ or the checkout."""
    files = sorted(CONF.rglob("*.yaml")) + PAGES
    missing = []
    for f, path in cited(CITED_DOC, files):
        if not (REPO / path).exists() and path not in EXAMPLES:
            missing.append(f"{f.relative_to(REPO)}: {path}")
    for f, path in cited(CITED_MODULE, files):
        if path.startswith(("docs/", "conf/", "tools/", "benchmarks/", "tests/")):
            continue
        if not any((root / path).exists() for root in (PACKAGE, REPO, REPO / "src")):
            missing.append(f"{f.relative_to(REPO)}: {path}")
    assert sorted(set(missing)) == []


def modules(package: Path) -> set[str]:
    return {p.stem for p in package.glob("*.py") if p.stem != "__init__"} | \
        {p.parent.name for p in package.glob("*/__init__.py")}


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_a_package_docstring_names_its_modules_and_only_them(package: Path) -> None:
    """Each package's __init__ docstring ends with `Modules: a, b, c.`: the modules (and sub-packages) it holds, no
    more and no fewer, so the docstring a newcomer reads first cannot describe modules that moved away."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    listed = re.search(r"^Modules: ([\w,\s]+)\.$", doc, re.MULTILINE)
    assert listed, f"{package.name}/__init__.py: its docstring lists no `Modules: a, b, c.`"
    named = {n.strip() for n in listed.group(1).split(",")}
    assert sorted(named - modules(package)) == [], f"{package.name}/__init__.py names modules that are not there"
    assert sorted(modules(package) - named) == [], f"{package.name}/__init__.py does not name these modules"


def test_the_readme_stays_a_front_door() -> None:
    """The README is read first: under 150 lines (the rest in docs/, its results table the headline rows only)."""
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines < 150, f"README.md: {lines} lines; move detail to docs/ (docs/results.md for results)"
