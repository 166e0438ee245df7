"""Evaluation metrics against hand-computed cases, a plain-loop float64 oracle and trec_eval (pytrec_eval)."""

import math

import pytest
import torch

from engine.metrics import ndcg_at_k, precision_at_1, recall_at_k


def test_precision_at_1_ties_go_to_the_first_candidate():
    scores = torch.tensor([
        [0.9, 0.1, 0.3],  # strictly highest: right
        [0.5, 0.5, 0.2],  # tied with candidate 0: argmax-first -> right
        [0.4, 0.7, 0.7],  # two wrong candidates tied above it: wrong
        [0.1, 0.8, 0.8],  # tie not involving candidate 0: wrong
        [0.3, 0.1, 0.99],  # column 2 is padding of a 2-candidate row: right
        [0.3, 0.31, -5.0],  # padding does not hide a real better candidate: wrong
    ])
    counts = torch.tensor([3, 3, 3, 3, 2, 2])
    assert precision_at_1(scores, counts).tolist() == [True, True, False, False, True, False]
    # without the counts every column is a candidate
    assert precision_at_1(scores).tolist() == [True, True, False, False, False, False]


def test_precision_at_1_single_candidate_and_bad_shape():
    assert precision_at_1(torch.tensor([[-1.0], [0.0]])).tolist() == [True, True]
    with pytest.raises(ValueError):
        precision_at_1(torch.zeros(3, 0))


def test_ndcg_graded_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]])
    rel = torch.tensor([[0, 2, 0, 1, 0, 3, 0]])
    # ranked top 5: d0..d4 -> gains 0, 2, 0, 1, 0; ideal: 3, 2, 1, 0, 0
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(scores, rel, 5).item() == pytest.approx(dcg / idcg, abs=1e-12)
    # at k=1 the top document (d0) is not relevant
    assert ndcg_at_k(scores, rel, 1).item() == 0.0
    # k=7 sees d5 (gain 3 at rank 6)
    dcg7 = dcg + 3 / math.log2(7)
    idcg7 = idcg
    assert ndcg_at_k(scores, rel, 7).item() == pytest.approx(dcg7 / idcg7, abs=1e-12)


def test_ndcg_fewer_than_k_relevant_no_relevant_and_short_corpus():
    scores = torch.tensor([
        [0.1, 0.9, 0.8, 0.2, 0.3, 0.0],  # one relevant doc (d2) ranked 2nd
        [0.1, 0.9, 0.8, 0.2, 0.3, 0.0],  # judged but nothing relevant
        [0.5, 0.5, 0.4, 0.3, 0.2, 0.1],  # tie d0/d1, d1 relevant: stable order puts d0 first
    ])
    rel = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    expected = [1 / math.log2(3), 0.0, 1 / math.log2(3)]
    assert ndcg_at_k(scores, rel, 5).tolist() == pytest.approx(expected, abs=1e-12)
    # a corpus of 2 pages, k = 5: ideal DCG over the 2 that exist
    two = ndcg_at_k(torch.tensor([[0.2, 0.7]]), torch.tensor([[2.0, 1.0]]), 5).item()
    assert two == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)), abs=1e-12)


def test_recall_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]])
    rel = torch.tensor([[0, 2, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    assert recall_at_k(scores, rel, 1).tolist() == [0.0, 0.0]
    assert recall_at_k(scores, rel, 5).tolist() == pytest.approx([1 / 3, 0.0])
    assert recall_at_k(scores, rel, 7).tolist() == pytest.approx([1.0, 0.0])


def _ndcg_loops(scores, rel, k):
    out = []
    for s_row, r_row in zip(scores.tolist(), rel.tolist()):
        ranked = sorted(range(len(s_row)), key=lambda j: (-s_row[j], j))[:k]
        dcg = sum(r_row[j] / math.log2(i + 2) for i, j in enumerate(ranked))
        ideal = sorted(r_row, reverse=True)[:k]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        out.append(dcg / idcg if idcg > 0 else 0.0)
    return out


@pytest.mark.parametrize("q,d,k", [(7, 13, 5), (1, 3, 5), (31, 97, 10)])
def test_ndcg_matches_loop_oracle_on_random_graded_qrels(q, d, k):
    scores = torch.randn(q, d)
    rel = torch.randint(0, 4, (q, d)) * (torch.rand(q, d) < 0.3)
    assert ndcg_at_k(scores, rel, k).tolist() == pytest.approx(_ndcg_loops(scores, rel, k), abs=1e-12)


def test_ndcg_and_recall_equal_trec_eval():
    """pytrec_eval (trec_eval's C code, which ViDoRe and MTEB score with) on graded qrels (0 included), tied scores
    and ids whose byte order decides ties (trec_eval ranks a tie by document id, highest first: the column order
    engine.evaluate.score_beir gives), queries judged only 0 among them."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = torch.Generator().manual_seed(0)
    measures = {"ndcg_cut_5": (ndcg_at_k, 5), "ndcg_cut_10": (ndcg_at_k, 10), "recall_1": (recall_at_k, 1),
                "recall_5": (recall_at_k, 5), "recall_10": (recall_at_k, 10)}
    checked = 0
    for _ in range(200):
        n_docs, n_queries = int(torch.randint(1, 16, (1,), generator=rng)), int(torch.randint(1, 5, (1,), generator=rng))
        ids = sorted({f"{'dDxa'[int(torch.randint(0, 4, (1,), generator=rng))]}{int(torch.randint(0, 40, (1,), generator=rng))}"
                      for _ in range(n_docs)}, key=str.encode, reverse=True)
        levels = torch.tensor([0.1, 0.2, 0.3, 0.5])  # few distinct scores: many ties
        scores = torch.where(torch.rand(n_queries, len(ids), generator=rng) < 0.7,
                             levels[torch.randint(0, 4, (n_queries, len(ids)), generator=rng)],
                             torch.rand(n_queries, len(ids), generator=rng)).double()
        judged = torch.rand(n_queries, len(ids), generator=rng) < 0.6
        judged[:, 0] = True  # every query judged on at least one document
        relevance = torch.randint(0, 4, (n_queries, len(ids)), generator=rng) * judged
        qrels = {f"q{q}": {d: int(relevance[q, j]) for j, d in enumerate(ids) if judged[q, j]} for q in range(n_queries)}
        run = {f"q{q}": {d: float(scores[q, j]) for j, d in enumerate(ids)} for q in range(n_queries)}
        truth = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5", "ndcg_cut.10", "recall.1", "recall.5",
                                                       "recall.10"}).evaluate(run)
        for name, (metric, k) in measures.items():
            ours = metric(scores, relevance.double(), k)
            assert ours.tolist() == pytest.approx([truth[f"q{q}"][name] for q in range(n_queries)], abs=1e-12), name
            checked += n_queries
    assert checked > 1000
