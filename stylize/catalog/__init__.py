"""Catalogs: manifests, storage (local and S3), metadata, one job end to end. Never imports Prefect or rich."""
