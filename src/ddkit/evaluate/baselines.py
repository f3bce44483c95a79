"""Baselines every method is judged against with the same evaluator (the random real subset lives
with the methods, :mod:`ddkit.methods.baseline`, where it is also the method ``random``)."""

from ddkit.data.sampling import check_ipc, sample_real_per_class  # noqa: F401  (re-exported by ddkit.evaluate)
from ddkit.methods.baseline import random_subset  # noqa: F401  (re-exported by ddkit.evaluate)
