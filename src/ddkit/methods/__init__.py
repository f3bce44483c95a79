"""ddkit.methods: distillation methods, each a short composition of the layers above.

``SPECS`` (name -> :class:`MethodSpec`) is the registry; ``METHODS`` (name -> entry point) its
first form, kept for scripts written against it.
"""

from ddkit.methods.registry import (
    METHODS, SPECS, MethodSpec, describe_methods, get_method, get_spec, method_names, register, register_method, unregister,
)
from ddkit.methods import baseline as _baseline  # noqa: F401  (registers random)
from ddkit.methods import dm_family as _dm_family  # noqa: F401  (registers dm, idm, iid, idm-iid, ddm)
from ddkit.methods import stats_family as _stats_family  # noqa: F401  (registers sre2l, cda, gvbsm)

__all__ = ["METHODS", "SPECS", "MethodSpec", "describe_methods", "get_method", "get_spec", "method_names", "register", "register_method",
           "unregister"]
