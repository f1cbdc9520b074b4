"""The Prometheus text exposition format, version 0.0.4, for ``GET /metrics``.

Written here rather than by ``prometheus_client``, whose import pulls in its own HTTP
servers, ``urllib.request``, ``email``, ``gzip`` and ``wsgiref`` (about 1 MiB of every
agent's RSS) for what is, for a custom collector of counters and gauges, a few lines
of text. The output is byte for byte what ``prometheus_client.generate_latest`` wrote
for the same families (the unit tests compare the two on generated input): counters
are exposed with the ``_total`` suffix, labels sorted by name, label values and help
text escaped, and numbers formatted as Go formats them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final, Literal

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["counter", "gauge"]
Sample = tuple[Mapping[str, str], float]


def go_float(value: float) -> str:
    """A sample value as Prometheus (Go) writes it: ``1.0``, ``1.234567e+06``, ``+Inf``."""
    d = float(value)
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to an exponent sooner than Python's repr
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def family(name: str, doc: str, kind: Kind, samples: Iterable[Sample]) -> str:
    """One metric family: HELP and TYPE lines, then one line per (labels, value).

    ``name`` is given without ``_total``; a counter is exposed with it.
    """
    exposed = f"{name}_total" if kind == "counter" else name
    lines = [f"# HELP {exposed} {_escape_help(doc)}\n", f"# TYPE {exposed} {kind}\n"]
    for labels, value in samples:
        text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels.items()))
        lines.append(
            f"{exposed}{{{text}}} {go_float(value)}\n" if text else f"{exposed} {go_float(value)}\n"
        )
    return "".join(lines)


def counter(name: str, doc: str, value: float) -> str:
    return family(name, doc, "counter", [({}, value)])


def gauge(name: str, doc: str, value: float) -> str:
    return family(name, doc, "gauge", [({}, value)])


def labelled(
    name: str, doc: str, kind: Kind, label: str, values: Iterable[tuple[str, float]]
) -> str:
    """A family with one label, one sample per (label value, value)."""
    return family(name, doc, kind, (({label: key}, value) for key, value in values))
