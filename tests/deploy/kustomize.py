"""A small kustomize renderer for the tests: the subset deploy/k8s uses, so `make test` needs no
kubectl. resources (files and directories), components, namespace, images, and patches (a
`$patch: delete` or a strategic merge that merges lists of named objects by name). Where
kubectl is installed, tests/deploy/test_k8s.py checks this renders what `kubectl kustomize` does.
"""
import copy
from pathlib import Path

import yaml

# the kinds of deploy/k8s that live in no namespace
CLUSTER_KINDS = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass"}


def _kustomization(d: Path) -> dict:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (d / name).is_file():
            return yaml.safe_load((d / name).read_text()) or {}
    raise FileNotFoundError(f"no kustomization.yaml in {d}")


def _load(path: Path) -> list[dict]:
    return [copy.deepcopy(doc) for doc in yaml.safe_load_all(path.read_text()) if doc]


def key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def merge(base, patch):
    """Strategic merge, the part deploy/k8s uses: maps merge, lists of maps with a `name`
    merge by name (new names appended), any other list or scalar is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _set_images(docs: list[dict], images: list[dict]) -> None:
    by_name = {i["name"]: i for i in images}

    def fix(containers):
        for c in containers or []:
            name = c["image"].split("@")[0].rsplit(":", 1)[0] if ":" in c["image"].split("/")[-1] else c["image"]
            if name in by_name:
                i = by_name[name]
                new = i.get("newName", name)
                c["image"] = f"{new}@{i['digest']}" if "digest" in i else f"{new}:{i.get('newTag', 'latest')}"

    for d in docs:
        spec = d.get("spec", {})
        pod = spec.get("template", {}).get("spec") or (spec.get("jobTemplate", {}).get("spec", {})
                                                       .get("template", {}).get("spec"))
        if pod:
            fix(pod.get("containers"))
            fix(pod.get("initContainers"))


def _apply_patch(docs: list[dict], patch: dict) -> list[dict]:
    k = key(patch)
    if patch.get("$patch") == "delete":
        kept = [d for d in docs if key(d) != k]
        assert len(kept) == len(docs) - 1, f"delete patch matches nothing: {k}"
        return kept
    matched = [i for i, d in enumerate(docs) if key(d) == k]
    assert len(matched) == 1, f"patch matches {len(matched)} resources: {k}"
    docs[matched[0]] = merge(docs[matched[0]], patch)
    return docs


def render(d: Path) -> list[dict]:
    """The resources of the kustomization in directory `d`."""
    d = Path(d)
    k = _kustomization(d)
    docs: list[dict] = []
    for r in k.get("resources", []):
        p = d / r
        docs += render(p) if p.is_dir() else _load(p)
    for c in k.get("components", []):
        comp = _kustomization(d / c)
        assert comp.get("kind") == "Component", f"{d / c} is not a Component"
        for r in comp.get("resources", []):
            docs += _load(d / c / r)
        if comp.get("images"):
            _set_images(docs, comp["images"])
    if k.get("namespace"):
        for doc in docs:
            if doc["kind"] not in CLUSTER_KINDS:
                doc["metadata"]["namespace"] = k["namespace"]
    for p in k.get("patches", []):
        for patch in (yaml.safe_load_all(p["patch"]) if "patch" in p else yaml.safe_load_all((d / p["path"]).read_text())):
            if patch:
                docs = _apply_patch(docs, patch)
    if k.get("images"):
        _set_images(docs, k["images"])
    unsupported = set(k) - {"apiVersion", "kind", "resources", "components", "namespace", "patches", "images"}
    assert not unsupported, f"{d}: the test renderer does not handle {sorted(unsupported)}"
    return docs
