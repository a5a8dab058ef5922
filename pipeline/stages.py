"""The pipeline's stages in `dvc.yaml` order: one module `pipeline.<stage>` and one params
section each (a contract test keeps the three in step)."""

STAGES = ("shard", "stage1", "export", "stage2", "evaluate", "package")
# What `ecvl seeds` runs per seed: up to the tables (packaging a classifier per seed is not
# what a seed comparison is for).
TABLE_STAGES = STAGES[: STAGES.index("evaluate") + 1]
