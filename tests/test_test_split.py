"""No selection on the test split: outside the data loaders, only the evaluator's final test and
a teacher's reported accuracy read it (docs/bench.md, "No selection on the test split")."""

import re
from pathlib import Path

import ddkit

ROOT = Path(ddkit.__file__).parent
#: file -> how many reads of the test split it may hold, and why
ALLOWED = {
    "evaluate/protocols.py": 2,   # the final-epoch test of every evaluation run (images and labels)
    "methods/squeeze.py": 1,      # a teacher's test accuracy, reported in its cache entry, never used to choose
}
READS = re.compile(r"""\.test\b(?!_)|["']test["']""")


def test_reads(source: str) -> int:
    """How many lines of ``source`` (comments and docstring lines without code aside) read a test split."""
    count = 0
    for line in source.splitlines():
        code = line.split("#", 1)[0]
        if READS.search(code) and ("real" in code or "split" in code):
            count += 1
    return count


test_reads.__test__ = False  # a helper, not a test


def test_the_counter_sees_the_forms_the_code_uses():
    assert test_reads('x = normalized_split(real, "test", device)\ny = real.test.labels\n# real.test\n') == 2
    assert test_reads("z = real.train.images\n") == 0


def test_only_the_final_evaluation_and_teacher_reports_read_the_test_split():
    found = {str(path.relative_to(ROOT)): test_reads(path.read_text()) for path in sorted(ROOT.rglob("*.py"))}
    # ddkit.data reads the split's files and hands them over; it picks nothing
    readers = {name: count for name, count in found.items() if count and not name.startswith("data/")}
    assert readers == ALLOWED
