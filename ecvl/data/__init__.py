"""Datasets, long-tail construction, webdataset shards and the caches stage II reads."""
