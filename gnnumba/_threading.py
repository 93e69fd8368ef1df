"""Choose a thread-safe Numba threading layer before any parallel kernel runs.

Numba's fallback "workqueue" layer aborts the whole process when two Python threads enter
parallel kernels at once (e.g. a torch DataLoader thread and the main thread). "threadsafe"
picks TBB or OpenMP, both safe under concurrent calls. A user's explicit choice
(NUMBA_THREADING_LAYER or numba.config.THREADING_LAYER) is left alone.
"""

import os

import numba

if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "threadsafe"
