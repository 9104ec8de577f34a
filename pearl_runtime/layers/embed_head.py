"""Vocab-parallel embedding and LM head: each rank holds a slice of the vocabulary."""
import torch
import torch.nn.functional as F
from torch import nn

from pearl_runtime.utils.dist import all_gather_last_dim, all_reduce, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.tp = tp_size()
        # pad the vocabulary so every rank holds the same number of rows
        self.rows = -(-vocab_size // self.tp)
        self.start = tp_rank() * self.rows
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
            raise RuntimeError("vocabulary shape mismatch")
        part = loaded[self.start:self.start + self.rows]
        param.data[:part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        y = F.embedding(local.clamp(0, self.rows - 1), self.weight) * mine.unsqueeze(-1)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    fp8 = None   # (fp8 weight, row scales) once layers/fp8.py has rounded it

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp == 1:
            return logits
        return all_gather_last_dim(logits, self.tp)[..., :self.vocab_size]
