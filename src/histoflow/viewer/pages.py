"""The viewer's pages as HTML, linked by relative paths so that the server and a static export (opened from disk)
share them: index.html (the slides list), report/index.html (the run's report.md), slides/<name>.html (a slide in
OpenSeadragon with its overlays)."""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from markdown_it import MarkdownIt

from histoflow.viewer.run_folder import RunFolder, SlideEntry

COLUMNS = ["patient", "label", "prediction", "probability", "tiles", "fold", "bag"]


def _page(title: str, body: str, static: str, scripts: list[str] = ()) -> str:
    tags = "".join(f'<script src="{escape(s)}"></script>' for s in scripts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            '<link rel="icon" href="data:,">'
            f'<link rel="stylesheet" href="{static}viewer.css">'
            f'<script src="{static}errors.js"></script></head>\n<body>\n{body}\n{tags}</body></html>\n')


def slide_url(entry: SlideEntry) -> str:
    return quote(entry.name)


def index_page(run: RunFolder) -> str:
    columns = [c for c in COLUMNS if any(e.row.get(c) for e in run.slides.values())]
    head = "".join(f'<th data-sort="{i + 1}">{escape(c)}</th>' for i, c in enumerate(columns))
    rows = "".join(f'<tr><td><a href="slides/{slide_url(e)}.html">{escape(e.name)}</a></td>'
                   + "".join(f"<td>{escape(e.row.get(c, ''))}</td>" for c in columns) + "</tr>\n"
                   for e in run.slides.values())
    report = ('<p><a href="report/index.html">The report</a> (report.md and its figures)</p>'
              if run.report_dir is not None else "")
    table = (f'<table class="sortable"><thead><tr><th data-sort="0">slide</th>{head}</tr></thead>'
             f"<tbody>\n{rows}</tbody></table>" if run.slides else "<p>No slide maps in this run.</p>")
    body = (f"<h1>{escape(run.root.name)}</h1>\n{report}\n<h2>Slides ({len(run.slides)})</h2>\n"
            f"<p>Click a column to sort.</p>\n{table}")
    return _page(f"histoflow: {run.root.name}", body, "static/", ["static/table.js"])


def report_page(run: RunFolder) -> str:
    markdown = (run.report_dir / "report.md").read_text()
    html = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    body = f'<p><a href="../index.html">Slides</a></p>\n<article class="report">\n{html}</article>'
    return _page(f"report: {run.root.name}", body, "../static/")


def slide_page(entry: SlideEntry) -> str:
    name = slide_url(entry)
    facts = " &middot; ".join(f"{escape(k)}: {escape(v)}" for k, v in entry.row.items() if v)
    body = (f'<header><a href="../index.html">Slides</a> <b>{escape(entry.name)}</b> <span>{facts}</span>\n'
            '<label>overlay <select id="overlay"></select></label>\n'
            '<label>opacity <input id="opacity" type="range" min="0" max="1" step="0.05" value="0.5"></label>\n'
            f'<a href="{name}.geojson" download>GeoJSON (QuPath)</a>\n'
            '<span id="readout">point at a tile</span></header>\n<div id="viewer"></div>')
    return _page(entry.name, body, "../static/",
                 ["../static/openseadragon/openseadragon.min.js", f"{name}.js", "../static/slide.js"])
