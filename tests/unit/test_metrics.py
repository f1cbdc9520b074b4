"""meshd/metrics.py writes what prometheus_client's ``generate_latest`` wrote.

``/metrics`` used to be rendered by prometheus_client from a custom collector; the
agent now writes the text itself (meshd/metrics.py says why). prometheus_client stays
a test dependency so that these tests can hold the two byte for byte on generated
families: names, help text with backslashes and newlines, label values with quotes,
newlines and non-ASCII text, and every kind of number (large, tiny, negative,
infinite, NaN).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from meshd.metrics import family, go_float

_name = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True).filter(
    lambda n: not n.endswith(("_total", "_created", "_gsum", "_gcount", "_sum", "_count"))
)
_label = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
_value = st.one_of(
    st.integers(min_value=0, max_value=2**63),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 999_999, 1_000_000, 1_234_567, 0.1, 1e-7, 1e21, 123456.75]),
)
_text = st.text(max_size=30)
_family = st.tuples(
    _name,
    _text,
    st.sampled_from(["counter", "gauge"]),
    st.lists(_label, max_size=3, unique=True),
    st.lists(st.tuples(st.lists(_text, min_size=3, max_size=3), _value), max_size=4),
)


class _Fixed(Collector):
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        yield from self.families


def _reference(spec: tuple[str, str, str, list[str], list[tuple[list[str], float]]]) -> bytes:
    name, doc, kind, labels, samples = spec
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    fam = cls(name, doc, labels=labels)
    for values, value in samples:
        fam.add_metric(values[: len(labels)], value)
    registry = CollectorRegistry()
    registry.register(_Fixed([fam]))
    return generate_latest(registry)


def _ours(spec: tuple[str, str, str, list[str], list[tuple[list[str], float]]]) -> bytes:
    name, doc, kind, labels, samples = spec
    assert kind in ("counter", "gauge")
    rows = [(dict(zip(labels, values, strict=False)), value) for values, value in samples]
    return family(name, doc, kind, rows).encode()


@settings(max_examples=150, deadline=None)
@given(spec=_family)
def test_same_bytes_as_prometheus_client(spec: Any) -> None:
    assert _ours(spec) == _reference(spec)


def test_unlabelled_counter_and_gauge() -> None:
    assert family("meshd_x", "Help", "counter", [({}, 3)]) == (
        "# HELP meshd_x_total Help\n# TYPE meshd_x_total counter\nmeshd_x_total 3.0\n"
    )
    assert family("meshd_y", "a\\b\nc", "gauge", [({}, 1_234_567)]) == (
        "# HELP meshd_y a\\\\b\\nc\n# TYPE meshd_y gauge\nmeshd_y 1.234567e+06\n"
    )


def test_go_float() -> None:
    assert [go_float(v) for v in (0, 1, 1e6, -1e6, math.inf, -math.inf, math.nan)] == [
        "0.0", "1.0", "1e+06", "-1000000.0", "+Inf", "-Inf", "NaN",
    ]  # fmt: skip


def test_parses_back() -> None:
    text = family(
        "meshd_z", "Z", "counter", [({"reason": 'q"uote\n'}, 2), ({"reason": "plain"}, 5)]
    )
    (parsed,) = text_string_to_metric_families(text)
    assert parsed.name == "meshd_z" and parsed.type == "counter"
    assert {s.labels["reason"]: s.value for s in parsed.samples} == {'q"uote\n': 2, "plain": 5}
