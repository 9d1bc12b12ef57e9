"""Run with the kserve SDK's Python (conftest's ``kserve_python``): checks Kubernetes
documents (YAML on stdin) against the field tables of KServe's generated models.

The SDK's models (``kserve.models``, with ``kubernetes.client.models`` for the core
types they embed) are generated from KServe's OpenAPI definitions, the same Go types
its CRDs in ``config/crd`` are generated from: every field a document uses must be one
they define, with a value of the type they give. Prints one line per problem."""
import sys
from importlib.metadata import version

import kubernetes.client.models as core
import yaml
from kserve import models as kserve_models

ROOTS = {("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
         ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
         ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService"}
SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object,
           "datetime": str, "date": str}


def check(value, kind: str, path: str, problems: list[str]) -> None:
    if kind.startswith("List["):                 # the kubernetes client's spelling
        kind = f"list[{kind[5:-1]}]"
    elif kind.startswith("Dict["):
        kind = f"dict({kind[5:-1]})"
    if kind.startswith("list["):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list ({kind})")
            return
        for i, item in enumerate(value):
            check(item, kind[5:-1], f"{path}[{i}]", problems)
    elif kind.startswith("dict("):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a map ({kind})")
            return
        for key, item in value.items():
            check(item, kind[kind.index(",") + 1:-1].strip(), f"{path}.{key}", problems)
    elif kind in SCALARS:
        if not isinstance(value, SCALARS[kind]) or (kind == "int" and isinstance(value, bool)):
            problems.append(f"{path}: expected {kind}, got {value!r}")
    else:
        cls = getattr(kserve_models, kind, None) or getattr(core, kind)
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object ({kind})")
            return
        fields = {wire: name for name, wire in cls.attribute_map.items()}
        for key, item in value.items():
            if key not in fields:
                problems.append(f"{path}.{key}: not a field of {kind}")
            else:
                check(item, cls.openapi_types[fields[key]], f"{path}.{key}", problems)


problems: list[str] = []
for doc in yaml.safe_load_all(sys.stdin):
    root = ROOTS.get((doc.get("apiVersion"), doc.get("kind")))
    if root is None:
        problems.append(f"{doc.get('apiVersion')} {doc.get('kind')}: not a KServe kind here")
    else:
        check(doc, root, doc["kind"], problems)
print(f"kserve {version('kserve')}")
print("\n".join(problems))
