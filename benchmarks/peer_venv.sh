#!/usr/bin/env bash
# A virtual environment holding histolab 0.7.0, the peer tiler bench_wsi.py --peer compares against; kept apart
# from histoflow's (histolab pins numpy 1.24, scikit-image 0.19 and openslide-python 1.3.1).
#     benchmarks/peer_venv.sh [DIR]      # default .peer-venv; then: bench_wsi.py --peer DIR/bin/python
# openslide-python 1.3.1 is built from its sdist (a C compiler and Python headers needed) and looks for OpenSlide 3's
# libopenslide.so.0: the venv links it to openslide-bin's OpenSlide 4 (the same calls), found through
# LD_LIBRARY_PATH, which bench_wsi.py sets from DIR/oslib.
set -euo pipefail
dir=${1:-.peer-venv}
python3 -m venv "$dir"
"$dir/bin/pip" install -q --prefer-binary histolab==0.7.0 openslide-bin
lib=$("$dir/bin/python" -c "import openslide_bin, pathlib; print(pathlib.Path(openslide_bin.__file__).parent)")
mkdir -p "$dir/oslib"
ln -sf "$lib/libopenslide.so.1" "$dir/oslib/libopenslide.so.0"
LD_LIBRARY_PATH="$dir/oslib" "$dir/bin/python" -c "import histolab, openslide; print('histolab', histolab.__version__, 'on OpenSlide', openslide.__library_version__)"
