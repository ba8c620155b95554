"""A static export of the viewer: every page, tile (a .dzi pyramid), overlay and file of the site written under a
folder, opening from disk (file://) or from any static host."""

from __future__ import annotations

from pathlib import Path

from histoflow.common.errors import NotWritableError
from histoflow.common.progress import progress_bar
from histoflow.viewer.site import Site


def export_site(site: Site, out: str | Path, progress: bool = True) -> Path:
    """Write the site under `out`; returns its index.html."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NotWritableError(f"view.export={out}: cannot write there ({e.strerror}). Fix: another folder") from e
    paths = list(site.paths())
    with progress_bar(progress) as bar:
        task = bar.add_task("export", total=len(paths), rate="")
        for i, path in enumerate(paths, 1):
            body = site.get(path)
            if body is None:  # every path listed is served; a gap would be a broken page
                raise RuntimeError(f"viewer export: {path} listed but not served")
            target = out / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
            bar.update(task, completed=i)
    return out / "index.html"
