#!/usr/bin/env python3
"""Render a Helm chart offline with Helm's own engine, like `helm template`.

There is no `helm` binary on the project's machines; the PyPI package `helm-python-sdk` (import name
`helm_python`) binds Helm's official Go SDK (v4) through a C library, so the rendering, the values
schema validation and `fail` are Helm's own. Install: `pip install helm-python-sdk==0.2.2`.

Usage: helm-template.py CHART [-f VALUES.yaml]... [--set-json JSON]... [--lint]
Prints the manifests as one YAML stream (each preceded by `# Source: PATH`), or the error on stderr
with exit status 1 (a template's `fail`, a schema violation) or 2 (the SDK is missing).
"""
import argparse
import json
import sys

try:
    import helm_python as helm
except ImportError:
    sys.stderr.write("helm-python-sdk is not installed: pip install helm-python-sdk==0.2.2\n")
    sys.exit(2)


def merge(dst, src):
    """Deep-merges src into dst the way successive -f files do."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("chart")
    ap.add_argument("-f", "--values", action="append", default=[])
    ap.add_argument("--set-json", action="append", default=[], help="a JSON object merged over the values")
    ap.add_argument("--name", default="datapulse-bridge")
    ap.add_argument("--namespace", default="default")
    ap.add_argument("--lint", action="store_true", help="also run helm lint (strict) and fail on findings")
    a = ap.parse_args()
    values = {}
    for f in a.values:
        with open(f) as fh:
            merge(values, helm.values_from_yaml(fh.read()) or {})
    for j in a.set_json:
        merge(values, json.loads(j))
    try:
        with helm.Chart.load(a.chart) as chart:
            # What an install does: merge with the chart's defaults, validate against
            # values.schema.json, then render.
            chart.validate_schema(chart.merge_values(values))
            manifests = chart.render(values, name=a.name, namespace=a.namespace, is_install=True)
        if a.lint:
            report = helm.lint(a.chart, values, strict=True, namespace=a.namespace)
            bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
            if bad:
                sys.stderr.write("helm lint: %s\n" % json.dumps(bad))
                return 1
    except helm.HelmError as e:
        sys.stderr.write("%s\n" % e)
        return 1
    for path in sorted(manifests):
        body = manifests[path]
        if not body.strip() or path.endswith("NOTES.txt"):
            continue
        sys.stdout.write("---\n# Source: %s\n%s\n" % (path, body.strip("\n")))
    if any(p.endswith("NOTES.txt") for p in manifests):
        notes = [manifests[p] for p in manifests if p.endswith("NOTES.txt")][0]
        sys.stderr.write(notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
