"""Print gpserve's requirements from pyproject.toml, for an image's dependency layer
(built before the code is copied in, so it is rebuilt only when they change).

    python requirements.py [EXTRAS] [--cpu]

EXTRAS: comma-separated optional groups (tensorflow, torch). --cpu names the CPU
package `onnxruntime` in place of `onnxruntime-gpu` (about a tenth of its size).
"""
import sys
import tomllib

args = [a for a in sys.argv[1:] if a != "--cpu"]
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [e for e in (args[0] if args else "").split(",") if e]
requirements = project["dependencies"] + [
    r for e in extras for r in project["optional-dependencies"][e]]
for r in requirements:
    print(r.replace("onnxruntime-gpu", "onnxruntime") if "--cpu" in sys.argv else r)
