"""Renders every chart for every environment offline with Helm's own engine (helm-python-sdk).

Usage: python3 render.py PLAN.json OUT_DIR

PLAN.json lists the variants: {"name", "chart", "values": [files], "set": {...}, "release",
"namespace"}. Each variant's templates are written to OUT_DIR/<name>/<template path>, one file per
template that rendered to something, so kubernetes-validate and the doctor name the template a
finding comes from. Prints one JSON line per variant: templates written and objects per kind.
Exits non-zero on the first render or YAML error, naming the variant and template.
"""

import json
import os
import sys

import helm_python as helm
import yaml


def deep_merge(base, override):
    """Helm's rule for several -f files: maps merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def render(variant, out_dir):
    values = {}
    for path in variant.get("values", []):
        with open(path, encoding="utf-8") as handle:
            values = deep_merge(values, helm.values_from_yaml(handle.read()) or {})
    values = deep_merge(values, variant.get("set", {}))
    chart = helm.Chart.load(variant["chart"])
    try:
        rendered = chart.render(
            values=values,
            name=variant["release"],
            namespace=variant["namespace"],
            is_install=True,
        )
    finally:
        chart.close()
    kinds = {}
    written = 0
    target_root = os.path.join(out_dir, variant["name"])
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt") or not text.strip():
            continue
        documents = [doc for doc in yaml.safe_load_all(text) if doc]
        if not documents:
            continue
        for doc in documents:
            for field in ("apiVersion", "kind"):
                if not doc.get(field):
                    raise ValueError(f"{template}: an object without {field}")
            if not (doc.get("metadata") or {}).get("name"):
                raise ValueError(f"{template}: a {doc['kind']} without metadata.name")
            kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
        # Template paths start with the chart's name: keep the rest.
        relative = template.split("/", 1)[1] if "/" in template else template
        target = os.path.join(target_root, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(text)
        written += 1
    return {"variant": variant["name"], "templates": written, "kinds": kinds}


def main():
    plan_path, out_dir = sys.argv[1], sys.argv[2]
    with open(plan_path, encoding="utf-8") as handle:
        plan = json.load(handle)
    for variant in plan:
        try:
            summary = render(variant, out_dir)
        except Exception as err:  # noqa: BLE001 - reported with the variant, then fail
            print(f"render failed: {variant['name']}: {err}", file=sys.stderr)
            return 1
        print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
