"""Images -> folds -> patches -> shards -> batches: sources, the manifest and its leak audit, prepare, the shard format,
transforms and the LightningDataModule. Knows no model.

Modules: audit, datamodule, dataset, device_prefetch, download, fingerprint, folds, images, loader_config, locks,
manifest, packing, patches, pipeline, prepare, problems, shards, sources, stain, targets, transforms.
"""
