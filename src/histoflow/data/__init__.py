"""Images -> folds -> patches -> shards -> batches: sources, the manifest and its leak audit, prepare, the shard format,
transforms and the LightningDataModule. Knows no model."""
