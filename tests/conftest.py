"""Test-wide settings.

Hypothesis: no per-example deadline anywhere. The suite runs on shared 2-core machines
where a property example can stall for a second behind other work; a deadline would make
a slow machine fail a test, which our rule forbids (speed goals live in benchmarks/).
"""

from hypothesis import HealthCheck, settings

settings.register_profile("meshd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("meshd")
