"""ddkit.methods: distillation methods, each a short composition of the layers above."""

from ddkit.methods.registry import METHODS, get_method, register_method
from ddkit.methods import dm_family as _dm_family  # noqa: F401  (registers dm, idm, iid, idm-iid, ddm)
from ddkit.methods import stats_family as _stats_family  # noqa: F401  (registers sre2l, cda, gvbsm)

__all__ = ["METHODS", "get_method", "register_method"]
