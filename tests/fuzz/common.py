"""What the fuzz tests share: the served name, the fake gateways' limits, and the hypothesis
settings of every fuzz test."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SERVED_NAME = "fuzz-model"
VOCAB = 259
"""The byte-level tokenizer's vocabulary; ids 256..258 are outside the no-tokenizer model's."""
NO_TOKENIZER_VOCAB = 256
FAKE_MAX_MODEL_LEN = 160
"""Short, so that the context limits are reached by lists hypothesis draws quickly (and long
enough for a chat template around a few short turns)."""
FAKE_MAX_NUM_SEQS = 8

GATEWAYS = st.sampled_from(["bytes", "none"])
"""Which fake gateway (conftest.fakes): with the byte-level tokenizer, or with none."""


def fuzz_settings(cases: int) -> settings:
    """`cases` examples, reproducible (derandomized, no example database), no per-case
    deadline."""
    return settings(max_examples=cases, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)
