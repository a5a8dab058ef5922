"""The ECVL application: the `ecvl` CLI, params validation and one module per DVC stage.

`pipeline` imports `ecvl`; `ecvl` never imports `pipeline`.
"""

import os

# On a CPU the stages' data workers share the cores with torch's OpenMP threads, and OpenMP's
# default spin-waiting burns the time the workers need: stage I of the CIFAR-100-LT preset on
# 2 cores ran at 475 img/s spinning and 563 img/s passive, same losses. libgomp reads this once,
# when torch is first imported, so it is set here, before any stage imports torch; a value the
# user set wins. It has no effect on GPU work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
