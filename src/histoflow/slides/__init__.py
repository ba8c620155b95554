"""Whole-slide images: read region by region (reader, tiff), find the tissue (tissue), cut it into tiles and batch
them for a model (tiles), or into shards (shards). Prediction maps a model over them (histoflow.inference.slide_map)."""
