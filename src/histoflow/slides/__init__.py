"""Whole-slide images: one interface over two readers (slide, backend, openslide_reader, tiff_reader, tiff), the
tissue (tissue), the one tiling config (tiling), tiles batched for a model (tiles), stored JPEG tiles decoded where
the model runs (jpeg_tiles); a cohort of slides named in a checked CSV (table). Prediction maps a model over them
(histoflow.deployment.slide_map).

Modules: backend, jpeg_tiles, openslide_reader, slide, table, tiff, tiff_reader, tiles, tiling, tissue.
"""
