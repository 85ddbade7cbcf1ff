"""Pruning, final-cell derivation and the skip-connect restriction (SPEC section 2),
checked against hand-computed literals."""
import copy

import pytest
import torch

from derivation import (
    all_on_switches,
    count_skips,
    derive_cell_switches,
    derive_genotype,
    keep_best_op,
    keep_two_edges,
    ops_on,
    prune_switches,
    skip_budget_genotypes,
    switches_to_pairs,
    zero_none,
)
from genotypes import PRIMITIVES, Genotype

I = {name: k for k, name in enumerate(PRIMITIVES)}  # noqa: E741


def row(*names):
    """One edge's switches with exactly the given ops on."""
    return [p in names for p in PRIMITIVES]


# ---------------------------------------------------------------------------------------
# prune_switches
# ---------------------------------------------------------------------------------------

def test_prune_drops_the_k_lowest_per_edge():
    sw = all_on_switches()[:3]
    probs = [
        # none  maxp  avgp  skip  sep3  sep5  dil3  dil5
        [0.30, 0.02, 0.10, 0.05, 0.20, 0.15, 0.08, 0.10],
        [0.01, 0.20, 0.20, 0.30, 0.04, 0.15, 0.07, 0.03],
        [0.125] * 8,  # all tied: the earlier ops go first
    ]
    out = prune_switches(sw, probs, 3)
    assert [ops_on(r) for r in out] == [
        [0, 2, 4, 5, 7],   # dropped max_pool (.02), skip (.05), dil3 (.08)
        [1, 2, 3, 5, 6],   # dropped none (.01), dil5 (.03), sep3 (.04)
        [3, 4, 5, 6, 7],
    ]
    assert sw == all_on_switches()[:3]  # input not modified


def test_prune_stage2_columns_follow_ops_on():
    sw = [row("none", "avg_pool_3x3", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_5x5"),
          row("max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3", "dil_conv_5x5")]
    probs = torch.tensor([[0.50, 0.10, 0.20, 0.15, 0.05],
                          [0.10, 0.40, 0.05, 0.25, 0.20]])
    out = prune_switches(sw, probs, 2)
    assert [ops_on(r) for r in out] == [
        [I["none"], I["sep_conv_3x3"], I["sep_conv_5x5"]],
        [I["skip_connect"], I["dil_conv_3x3"], I["dil_conv_5x5"]],
    ]


def test_prune_drop_none_first_even_if_strongest():
    sw = [row("none", "sep_conv_3x3", "sep_conv_5x5"),
          row("skip_connect", "sep_conv_3x3", "dil_conv_3x3")]
    probs = [[0.60, 0.30, 0.10],
             [0.50, 0.20, 0.30]]
    final = prune_switches(sw, probs, 2, drop_none=True)
    assert [ops_on(r) for r in final] == [[I["sep_conv_3x3"]], [I["skip_connect"]]]
    # Without drop_none the strongest op, `none`, would survive.
    plain = prune_switches(sw, probs, 2)
    assert [ops_on(r) for r in plain] == [[I["none"]], [I["skip_connect"]]]


def test_prune_drop_none_with_more_ops():
    sw = [row("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_5x5")]
    final = prune_switches(sw, [[0.9, 0.01, 0.04, 0.03, 0.02]], 3, drop_none=True)
    # none, then the 2 lowest of the rest: max_pool (.01), dil5 (.02).
    assert ops_on(final[0]) == [I["skip_connect"], I["sep_conv_3x3"]]


def test_prune_rejects_bad_input():
    sw = [row("none", "sep_conv_3x3", "sep_conv_5x5")]
    with pytest.raises(ValueError):
        prune_switches(sw, [[0.5, 0.5, 0.0]], 3)  # would leave nothing
    with pytest.raises(ValueError):
        prune_switches(sw, [[0.5, 0.5]], 1)  # 2 weights for 3 ops
    with pytest.raises(ValueError):
        prune_switches(sw, [[0.2, 0.3, 0.5]] * 2, 1)  # 2 rows for 1 edge


# ---------------------------------------------------------------------------------------
# The final cell. A stage-3 cell (3 ops per edge) designed by hand.
# Edges: node 0 = e0 e1, node 1 = e2..e4, node 2 = e5..e8, node 3 = e9..e13.
# ---------------------------------------------------------------------------------------

NSS = row("none", "skip_connect", "sep_conv_3x3")
SSD = row("skip_connect", "sep_conv_3x3", "dil_conv_3x3")
NS35 = row("none", "sep_conv_3x3", "sep_conv_5x5")
MS5 = row("max_pool_3x3", "skip_connect", "sep_conv_5x5")
NSD3 = row("none", "skip_connect", "dil_conv_3x3")
NSD5 = row("none", "skip_connect", "dil_conv_5x5")

SWITCHES = [NSS, NSS, SSD, NSS, NS35, NSS, NSS, MS5, NSD3, NSS, NS35, NSS, SSD, NSD5]
PROBS = [
    [0.10, 0.60, 0.30],  # e0  none skip sep3 -> skip .60 (then sep3 .30)
    [0.50, 0.20, 0.30],  # e1  none skip sep3 -> sep3 .30 (none is ignored)
    [0.70, 0.20, 0.10],  # e2  skip sep3 dil3 -> skip .70 (then sep3 .20)
    [0.20, 0.35, 0.45],  # e3  none skip sep3 -> sep3 .45
    [0.60, 0.25, 0.15],  # e4  none sep3 sep5 -> sep3 .25 (strength .25, not .60)
    [0.05, 0.55, 0.40],  # e5  none skip sep3 -> skip .55 (then sep3 .40)
    [0.30, 0.50, 0.20],  # e6  none skip sep3 -> skip .50 (then sep3 .20)
    [0.30, 0.32, 0.38],  # e7  maxp skip sep5 -> sep5 .38
    [0.42, 0.10, 0.48],  # e8  none skip dil3 -> dil3 .48
    [0.10, 0.65, 0.25],  # e9  none skip sep3 -> skip .65 (then sep3 .25)
    [0.20, 0.50, 0.30],  # e10 none sep3 sep5 -> sep3 .50
    [0.30, 0.30, 0.40],  # e11 none skip sep3 -> sep3 .40
    [0.45, 0.35, 0.20],  # e12 skip sep3 dil3 -> skip .45 (then sep3 .35)
    [0.80, 0.05, 0.15],  # e13 none skip dil5 -> dil5 .15
]

S, S3, D3 = "skip_connect", "sep_conv_3x3", "dil_conv_3x3"

# Unrestricted: 5 skip-connects (e0, e2, e5, e6, e9).
CELL_UNRESTRICTED = [(S, 0), (S3, 1), (S, 0), (S3, 1), (S, 0), (S, 1), (S, 0), (S3, 1)]
# Each step zeroes the weakest chosen skip and re-picks ops and edges:
CELL_BY_BUDGET = {
    # e6 (.50) zeroed: node 2 now keeps e5 (.55) and e8 (dil3 .48).
    4: [(S, 0), (S3, 1), (S, 0), (S3, 1), (S, 0), (D3, 3), (S, 0), (S3, 1)],
    # e5 (.55) zeroed: e5 becomes sep3 .40, still beats e7 (.38); e8 listed after e5.
    3: [(S, 0), (S3, 1), (S, 0), (S3, 1), (S3, 0), (D3, 3), (S, 0), (S3, 1)],
    # e0 (.60) zeroed: node 0 keeps both edges, e0 becomes sep3.
    2: [(S3, 0), (S3, 1), (S, 0), (S3, 1), (S3, 0), (D3, 3), (S, 0), (S3, 1)],
    # e9 (.65) zeroed: node 3 then keeps e10 and e12, whose skip (.45) comes in, so still
    # 2 skips; e12 zeroed next: node 3 keeps e10 (.50) and e11 (.40).
    1: [(S3, 0), (S3, 1), (S, 0), (S3, 1), (S3, 0), (D3, 3), (S3, 1), (S3, 2)],
    # e2 (.70) zeroed: node 1 keeps e3 (.45) and e4 (.25).
    0: [(S3, 0), (S3, 1), (S3, 1), (S3, 2), (S3, 0), (D3, 3), (S3, 1), (S3, 2)],
}


def test_zero_none_copies_and_zeroes_only_none():
    out = zero_none(SWITCHES, PROBS)
    assert out[0] == [0.0, 0.60, 0.30]
    assert out[2] == [0.70, 0.20, 0.10]  # none is off on e2: untouched
    assert out[7] == [0.30, 0.32, 0.38]
    assert PROBS[0] == [0.10, 0.60, 0.30]


def test_keep_best_op_and_two_edges():
    p = zero_none(SWITCHES, PROBS)
    best = keep_best_op(SWITCHES, p)
    assert [PRIMITIVES[ops_on(r)[0]] for r in best] == [
        S, S3, S, S3, S3, S, S, "sep_conv_5x5", D3, S, S3, S3, S, "dil_conv_5x5"]
    kept = keep_two_edges(best, p)
    assert [e for e, r in enumerate(kept) if any(r)] == [0, 1, 2, 3, 5, 6, 9, 10]


def test_unrestricted_cell():
    final = derive_cell_switches(SWITCHES, PROBS)
    assert count_skips(final) == 5
    assert switches_to_pairs(final) == CELL_UNRESTRICTED
    assert all(sum(r) <= 1 for r in final)


@pytest.mark.parametrize("budget", [5, 4, 3, 2, 1, 0])
def test_skip_restriction_by_hand(budget):
    probs = copy.deepcopy(PROBS)
    g = derive_genotype(SWITCHES, SWITCHES, probs, probs, max_skip=budget)
    expected = CELL_UNRESTRICTED if budget == 5 else CELL_BY_BUDGET[budget]
    assert g.normal == expected
    assert sum(op == S for op, _ in g.normal) == min(budget, 5)
    # The reduction cell is never restricted.
    assert g.reduce == CELL_UNRESTRICTED
    assert g.normal_concat == [2, 3, 4, 5] and g.reduce_concat == [2, 3, 4, 5]
    assert probs == PROBS  # the caller's weights are not modified


def test_derive_genotype_accepts_tensors():
    p = torch.tensor(PROBS)
    g = derive_genotype(SWITCHES, SWITCHES, p, p, max_skip=2)
    assert g == Genotype(CELL_BY_BUDGET[2], [2, 3, 4, 5], CELL_UNRESTRICTED, [2, 3, 4, 5])


def test_skip_budget_genotypes_lists_budgets_below_the_count():
    out = skip_budget_genotypes(SWITCHES, SWITCHES, PROBS, PROBS)
    assert [m for m, _ in out] == [4, 3, 2, 1, 0]
    for m, g in out:
        assert g.normal == CELL_BY_BUDGET[m]
        assert g.reduce == CELL_UNRESTRICTED


def test_skip_budget_genotypes_with_few_or_no_skips():
    # Budget 2 cell has 2 skips: only budgets 1 and 0 are listed.
    two = skip_budget_genotypes(SWITCHES, SWITCHES, _probs_without(0, 5, 6), PROBS)
    assert [m for m, _ in two] == [1, 0]
    no_skip = [row("none", "sep_conv_3x3", "sep_conv_5x5")] * 14
    flat = [[0.2, 0.5, 0.3]] * 14
    assert skip_budget_genotypes(no_skip, no_skip, flat, flat) == []


def _probs_without(*edges):
    """PROBS with the skip weight of the given edges (col 1 there) set to 0."""
    p = copy.deepcopy(PROBS)
    for e in edges:
        p[e][1] = 0.0
    return p


def test_derive_genotype_picks_strongest_edges_in_edge_order():
    # Stage-3 switches: sep3, sep5, dil5 on every edge (no none, no skip).
    sw = [row("sep_conv_3x3", "sep_conv_5x5", "dil_conv_5x5")] * 14
    probs = [
        [0.2, 0.3, 0.5], [0.6, 0.3, 0.1],                       # node 0: both kept
        [0.4, 0.3, 0.3], [0.3, 0.32, 0.38], [0.1, 0.8, 0.1],    # node 1: e4 (.8), e2 (.4)
        [0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.9, 0.05, 0.05],  # node 2: e8, e6
        [0.1, 0.2, 0.7], [0.3, 0.4, 0.3], [0.34, 0.33, 0.33],
        [0.3, 0.3, 0.4], [0.2, 0.75, 0.05],                     # node 3: e13 (.75), e9 (.7)
    ]
    g = derive_genotype(sw, sw, probs, probs)
    expected = [("dil_conv_5x5", 0), ("sep_conv_3x3", 1),
                ("sep_conv_3x3", 0), ("sep_conv_5x5", 2),
                ("dil_conv_5x5", 1), ("sep_conv_3x3", 3),
                ("dil_conv_5x5", 0), ("sep_conv_5x5", 4)]
    assert g.normal == expected and g.reduce == expected
    assert g.normal_concat == [2, 3, 4, 5]


def test_none_never_chosen_and_never_makes_an_edge_strong():
    sw = [row("none", "max_pool_3x3", "avg_pool_3x3")] * 14
    probs = [[0.9, 0.04, 0.06]] * 14
    probs[3] = [0.1, 0.5, 0.4]  # e3: weak none, strong max_pool
    g = derive_genotype(sw, sw, probs, probs)
    assert all(op != "none" for op, _ in g.normal)
    # Node 1: e3 is the strongest; e2 and e4 tie at .06 -> the later edge (e4) is kept.
    assert g.normal[2:4] == [("max_pool_3x3", 1), ("avg_pool_3x3", 2)]
