"""Retrieval metrics of the evaluations: MMEB precision@1, ViDoRe nDCG@k and recall@k.

Tie rules (documented because they decide scores when vectors coincide, e.g. a candidate
listed twice): precision@1 takes the argmax like `torch.argmax` / `np.argmax` in the
reference evaluation, i.e. the FIRST maximal candidate, so the correct candidate (index 0)
wins every tie. Rankings for nDCG/recall sort by score descending with a stable sort, so
tied documents keep column order: the caller's (`engine.evaluate.score_beir` orders columns by
document id, descending, trec_eval's tie rule). nDCG follows trec_eval's `ndcg_cut` (as pytrec_eval,
used by ViDoRe/MTEB): linear gain (the graded qrel score), discount 1/log2(rank + 1), ideal
DCG from the query's own qrels; a query whose qrels hold no positive score gets nDCG 0 and
recall 0 (it still counts in the mean).
"""

import math

import torch


def precision_at_1(scores: torch.Tensor, num_candidates: torch.Tensor | None = None) -> torch.Tensor:
    """scores: (R, C) similarities, candidate 0 the correct one; num_candidates: (R,) valid
    columns per row (ragged lists padded on the right), default all C -> (R,) bool hits."""
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be (rows, candidates) with candidates >= 1, got {tuple(scores.shape)}")
    if num_candidates is not None:
        valid = torch.arange(scores.shape[1], device=scores.device)[None, :] < num_candidates[:, None]
        scores = scores.masked_fill(~valid, float("-inf"))
    return scores.argmax(dim=1) == 0


def _ranked(scores: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, D) scores and relevance -> (Q, min(k, D)) relevance of the top-k ranked documents."""
    if scores.shape != relevance.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and relevance {tuple(relevance.shape)} must be the same (Q, D)")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return relevance.gather(1, order)


def ndcg_at_k(scores: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """scores: (Q, D) similarities; relevance: (Q, D) graded qrels (0 = not relevant) -> (Q,) float64."""
    gains = relevance.double().clamp_min(0)
    top = _ranked(scores, gains, k)
    discount = 1.0 / torch.log2(torch.arange(top.shape[1], dtype=torch.float64) + 2.0)
    dcg = (top * discount).sum(1)
    ideal = (torch.sort(gains, dim=1, descending=True).values[:, : top.shape[1]] * discount).sum(1)
    return torch.where(ideal > 0, dcg / ideal.clamp_min(math.ulp(0.0)), torch.zeros_like(dcg))


def recall_at_k(scores: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of each query's relevant documents (relevance > 0) ranked in the top k -> (Q,) float64."""
    relevant = (relevance > 0).double()
    found = _ranked(scores, relevant, k).sum(1)
    total = relevant.sum(1)
    return torch.where(total > 0, found / total.clamp_min(1), torch.zeros_like(found))
