"""Whole-slide images: read region by region (reader, tiff), find the tissue (tissue), cut it into tiles and batch
them for a model or into shards (tiles). Prediction maps a model over them (histoflow.inference.slide_map)."""
