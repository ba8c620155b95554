"""`histoflow view`: read the run's folder, then serve its site or export it (conf/view.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from histoflow.common.config import read_section
from histoflow.common.errors import ConfigError
from histoflow.slides.backend import DEFAULT_BACKEND
from histoflow.viewer.export import export_site
from histoflow.viewer.run_folder import read_run
from histoflow.viewer.server import LOCAL, serve
from histoflow.viewer.site import Site


@dataclass
class ViewConfig:
    """The `view` section of view.yaml."""

    host: str = LOCAL  # 127.0.0.1: this machine only
    port: int | None = None  # None: a free port
    slides_root: str | None = None  # where the slides are now, if they moved since the run
    export: str | None = None  # a folder: write static pages there instead of serving
    backend: str = DEFAULT_BACKEND
    source_mpp: float | None = None
    cache_mb: int = 256  # deep-zoom tiles kept per slide, MB
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> ViewConfig:
        view = read_section(cls, cfg, "view")
        if view.port is not None and not 0 < view.port < 65536:
            raise ConfigError(f"view.port={view.port}: expected 1-65535, or null for a free port")
        return view


def view(cfg: DictConfig) -> None:
    settings = ViewConfig.from_config(OmegaConf.to_container(cfg.view, resolve=True))
    run = read_run(cfg.folder, settings.slides_root)
    site = Site(run, settings.backend, settings.source_mpp, settings.cache_mb << 20)
    if settings.export is not None:
        try:
            index = export_site(site, settings.export, settings.progress)
        finally:
            site.close()
        print(f"histoflow view: {len(run.slides)} slide(s) exported; open {index.resolve().as_uri()}", flush=True)
        return
    where = "" if settings.host == LOCAL else f" (listening on {settings.host}: other machines can reach it)"
    serve(site, settings.host, settings.port,
          lambda url: print(f"histoflow view: {len(run.slides)} slide(s) of {run.root} at {url}{where}", flush=True))
