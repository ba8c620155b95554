"""Whole-slide images: one interface over two readers (slide, backend, openslide_reader, tiff_reader, tiff), the
tissue (tissue), the one tiling config (tiling), tiles batched for a model (tiles) or written as WebDataset tar
shards (shards); a cohort of slides named in a checked CSV (table); a cohort cut from real slides for tests
(cohort_fixture). Prediction maps a model over them (histoflow.inference.slide_map)."""
