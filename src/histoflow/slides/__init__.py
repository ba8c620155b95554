"""Whole-slide images: one interface over two readers (slide, backend, openslide_reader, tiff_reader, tiff), the
tissue (tissue), the one tiling config (tiling), tiles batched for a model (tiles); a cohort of slides named in a
checked CSV (table). Prediction maps a model over them (histoflow.inference.slide_map).

Modules: backend, openslide_reader, slide, table, tiff, tiff_reader, tiles, tiling, tissue.
"""
