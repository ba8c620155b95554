"""Frozen features: a frozen encoder over prepared patches, embedded once into shards beside them, then found."""
