"""Reading a Prometheus text exposition in tests: every sample by name and labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset], float]


def parse_samples(body: bytes | str) -> Samples:
    text = body.decode() if isinstance(body, bytes) else body
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample `name` with exactly these labels; None when there is none."""
    return samples.get((name, frozenset(labels.items())))


def names_of(samples: Samples) -> set[str]:
    return {name for name, _ in samples}
