"""The serving processes' garbage-collector settings (in a fresh interpreter: they are
process-wide)."""
import subprocess
import sys

CHECK = """
import gc
from gpserve import heap
heap.settle()
print(gc.get_freeze_count() > 1000, gc.get_threshold()[0])
class Cycle:
    pass
a = Cycle(); a.me = a
import weakref
gone = weakref.ref(a)
del a
gc.collect()
print(gone() is None)
"""


def test_settle_freezes_startup_objects_and_still_collects_cycles():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "20000", "True"]
