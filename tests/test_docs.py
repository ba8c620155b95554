"""The README and the docs pages: every relative link resolves, and the generated results are up to date."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

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
