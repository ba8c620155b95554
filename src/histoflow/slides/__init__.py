"""Whole-slide images: read region by region (reader, tiff), find the tissue (tissue), cut it into tiles and batch
them for a model (tiles), or into shards (shards); a cohort of slides named in a checked CSV (table). Prediction maps
a model over them (histoflow.inference.slide_map)."""
