"""ddkit: dataset distillation in one tested library.

    import ddkit
    ds = ddkit.distill("dm", dataset="fashion-mnist", ipc=10, preset="quick", seed=0)
    ds.save("runs/dm-fmnist-10"); ds = ddkit.load("runs/dm-fmnist-10")
    report = ddkit.evaluate(ds, protocol="hard", runs=3)
    other = ddkit.import_set("res_DM.pt", dataset="fashion-mnist")  # a set made by another tool
"""

import os as _os

# Every step allocates large fresh CPU tensors (the 128-channel maps of a whole real batch, tens of
# MB each) and Linux maps them page by page unless torch's allocator asks for transparent huge
# pages: with them the DM step at the paper batch ran 1.6x faster here (docs/speed.md). The variable
# is read when torch starts, so it takes effect when ddkit is imported first (always, for the ddkit
# command and its torchrun workers); THP_MEM_ALLOC_ENABLE=0 in the environment keeps it off.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# The same maps are allocated again every step: keep freed memory in malloc's heap instead of
# returning it to the system and faulting it in again (ddkit._allocator; DDKIT_KEEP_FREED_MEMORY=0
# keeps glibc's default).
from ddkit._allocator import keep_freed_memory_unless_told_not_to  # noqa: E402

keep_freed_memory_unless_told_not_to()

from ddkit._version import __version__  # noqa: E402

# The layer package ddkit.evaluate is imported first, then the name is rebound to the function, so
# `ddkit.evaluate(...)` is the function while `from ddkit.evaluate import ...` still reaches the layer.
import ddkit.evaluate as _evaluate_layer  # noqa: E402
from ddkit.api import distill, relabel, resume  # noqa: E402
from ddkit.errors import DDKitError  # noqa: E402
from ddkit.store import DistilledSet, load  # noqa: E402
from ddkit.store.importer import import_set  # noqa: E402

evaluate = _evaluate_layer.evaluate

__all__ = ["distill", "relabel", "resume", "evaluate", "load", "import_set", "DistilledSet", "DDKitError", "__version__"]
