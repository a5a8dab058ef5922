"""The ECVL application: the `ecvl` CLI, params validation and one module per DVC stage.

`pipeline` imports `ecvl`; `ecvl` never imports `pipeline`.
"""
