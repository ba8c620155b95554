"""Look at a run: `histoflow view <folder>` serves its report and slides (deep zoom, heatmap and attention
overlays) on 127.0.0.1; `histoflow view <folder> --export <dir>` writes the same pages as static files.

    histoflow view outputs/predict/<date>                    # a prediction over slides
    histoflow view outputs/train/multirun/<date>             # a multirun's k-fold report and attention maps
    histoflow view <folder> view.slides_root=/moved/slides view.port=8080
    histoflow view <folder> --export shared/<name>           # open shared/<name>/index.html from disk

Everything is in conf/view.yaml; the work is done in histoflow.viewer.view.view.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from histoflow.common.config import CONF_DIR
from histoflow.common.errors import report_errors


def hydra_arguments(args: list[str]) -> list[str]:
    """`<folder>` -> folder=<folder> and `--export <dir>` -> view.export=<dir>; the rest as Hydra takes them."""
    out, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--export" and rest:
            out.append(f"view.export={rest.pop(0)}")
        elif arg.startswith("--export="):
            out.append(f"view.export={arg.removeprefix('--export=')}")
        elif "=" not in arg and not arg.startswith("-") and not any(a.startswith("folder=") for a in out):
            out.append(f"folder={arg}")
        else:
            out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="view")
@report_errors
def _main(cfg: DictConfig) -> None:
    from histoflow.viewer.view import view  # the slide readers and aiohttp after the config: --help answers at once

    view(cfg)


def main() -> None:
    sys.argv = [sys.argv[0], *hydra_arguments(sys.argv[1:])]
    _main()


if __name__ == "__main__":
    main()
