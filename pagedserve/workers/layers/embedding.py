"""Vocabulary-parallel token embedding and LM head.

Both split the vocabulary rows across ranks: rank r owns rows [r * per_rank, (r+1) * per_rank),
with per_rank = ceil(vocab / tp) so any vocabulary size works (the last rank's tail is zero
padding and is cut off from the gathered logits). The LM head can share the embedding's weight
(tied embeddings) because both use the same layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.workers.layers.linear import linear, packed_weight_for
from pagedserve.workers.layers.parallel import TensorParallelGroup
from pagedserve.workers.layers.weight_utils import LoadedWeight, check_shape, read_range

_SINGLE_RANK = TensorParallelGroup()


class VocabParallelEmbedding(nn.Module):
    """Token ids -> hidden states; each rank looks up its own vocabulary rows, then all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int,
                 tp: TensorParallelGroup = _SINGLE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.rows_per_rank = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank
        # Rows of the real vocabulary this rank holds (the rest of its rows are padding).
        self.num_real_rows = max(0, min(self.rows_per_rank, vocab_size - self.vocab_start))
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight,
                      shard_id: object = None) -> None:
        del shard_id
        check_shape(loaded_weight, (self.vocab_size, self.hidden_size))
        param.data[self.num_real_rows:].zero_()
        if self.num_real_rows:
            param.data[: self.num_real_rows].copy_(
                read_range(loaded_weight, 0, self.vocab_start, self.num_real_rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        owned = (local_ids >= 0) & (local_ids < self.num_real_rows)
        hidden = F.embedding(local_ids.masked_fill(~owned, 0), self.weight)
        hidden.masked_fill_(~owned.unsqueeze(-1), 0)
        return self.tp.all_reduce(hidden)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states -> full-vocabulary logits.

    Each rank computes logits for its vocabulary rows; they are gathered to rank 0 only (other
    ranks get None, since only rank 0 samples) or, with `gather_to_all_ranks`, to every rank.
    """

    def __init__(self, vocab_size: int, hidden_size: int,
                 tp: TensorParallelGroup = _SINGLE_RANK, gather_to_all_ranks: bool = False) -> None:
        super().__init__(vocab_size, hidden_size, tp)
        self.gather_to_all_ranks = gather_to_all_ranks
        # (source weight, oneDNN copy) on CPU; see linear.pack_weights_for_cpu. With tied
        # embeddings the source is the embedding's weight, which the lookup keeps using.
        self.packed_weight = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = linear(hidden, self.weight, None, packed_weight_for(self))
        if self.tp.size == 1:
            return logits
        if self.gather_to_all_ranks:
            logits = self.tp.all_gather(logits, dim=-1)
        else:
            logits = self.tp.gather_to_first(logits, dim=-1)
            if logits is None:
                return None
        return logits[..., : self.vocab_size]
