#!/usr/bin/env python3
"""Parse PromQL expressions with a real PromQL parser (PyPI `promql-parser`, bindings of the Rust
crate of the same name). Reads a JSON array of expressions on stdin; prints each one that does not
parse with the parser's message and exits 1; exits 2 when the parser is not installed.

Grafana's interval variables ($__rate_interval, $__interval, $__range) are replaced by `5m` first;
other $variables only appear inside label matcher strings, where they are plain text.
"""
import json
import re
import sys

try:
    import promql_parser
except ImportError:
    sys.stderr.write("promql-parser is not installed: pip install promql-parser==0.11.0\n")
    sys.exit(2)

bad = 0
for expr in json.load(sys.stdin):
    text = re.sub(r"\$__(rate_interval|interval|range)", "5m", expr)
    try:
        promql_parser.parse(text)
    except Exception as e:  # the binding raises ValueError-like errors with the parser's message
        bad += 1
        sys.stdout.write("%s\n  in: %s\n" % (e, expr))
sys.exit(1 if bad else 0)
