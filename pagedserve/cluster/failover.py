"""What a gateway sends on for a request whose replica failed (see Gateway._send_on).

A request with no tokens yet is sent again whole. One with tokens goes on from them, as a new
prompt (its prompt plus those tokens) with the rest of its token budget, when that continues
exactly what it would have produced: one sequence, no beam search, no prompt logprobs (they
would be sent again for the longer prompt), greedy or unseeded sampling (a seed draws by
output position, which starts again at 0). Anything else cannot go on unchanged.
"""

from __future__ import annotations

import dataclasses

from pagedserve.engine.core import EngineCoreRequest
from pagedserve.sampling_params import SamplingParams


def continuation(request: EngineCoreRequest,
                 generated: list[list[int]] | None) -> EngineCoreRequest | None:
    """The request to send on, given each sequence's tokens so far (None for beam search, which
    reports nothing before its end); None when it cannot go on unchanged."""
    if not generated or not any(generated):
        return request
    params = request.params
    if not isinstance(params, SamplingParams) or params.n > 1 \
            or params.prompt_logprobs is not None \
            or (params.seed is not None and params.temperature > 0):
        return None
    tokens = generated[0]
    done = len(tokens)
    return dataclasses.replace(
        request, prompt_token_ids=[*request.prompt_token_ids, *tokens],
        params=dataclasses.replace(
            params, min_tokens=max(params.min_tokens - done, 0),
            max_tokens=None if params.max_tokens is None else params.max_tokens - done))
