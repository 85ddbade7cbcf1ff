"""Cell genotypes: the ``Genotype`` record, the op list, the published cells, and
lookup by name or JSON file (SPEC section 3).

A genotype lists, for each intermediate node i, two (op name, input) pairs at positions
2i and 2i+1. Input 0 is c_{k-2}, input 1 is c_{k-1}, input j >= 2 is intermediate node
j - 2. The JSON form, written by the search and read by every script::

    {"normal": [["sep_conv_3x3", 0], ...], "normal_concat": [2, 3, 4, 5],
     "reduce": [["max_pool_3x3", 0], ...], "reduce_concat": [2, 3, 4, 5]}
"""
from __future__ import annotations

import difflib
import json
import math
import os
from collections import namedtuple
from collections.abc import Sequence
from typing import Any

from errors import GenotypeError, load_json, write_json_atomic
from run_files import GENOTYPE

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

# The search space, in the order that switches, alphas and saved files use.
PRIMITIVES = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]
# Ops that published cells of other papers use; the evaluation networks build them too.
EXTRA_PRIMITIVES = ["sep_conv_7x7", "conv_7x1_1x7"]
KNOWN_OPS = PRIMITIVES + EXTRA_PRIMITIVES
# One colour per op, shared by the cell diagrams (visualize.py) and the plots of alphas
# (plots.py), so an op looks the same everywhere. Each op of the search space has a hue of
# its own (two greens and two blues were hard to tell apart in alphas.png): none grey, the
# pools blue and olive, skip_connect red (the op of the DARTS collapse), the convolutions
# green, pink, orange and purple; the two ops of other papers' cells brown and cyan.
OP_COLORS = {
    "none": "#9e9e9e",
    "max_pool_3x3": "#1f77b4",
    "avg_pool_3x3": "#bcbd22",
    "skip_connect": "#d62728",
    "sep_conv_3x3": "#2ca02c",
    "sep_conv_5x5": "#e377c2",
    "dil_conv_3x3": "#ff7f0e",
    "dil_conv_5x5": "#9467bd",
    "sep_conv_7x7": "#8c564b",
    "conv_7x1_1x7": "#17becf",
}
assert set(OP_COLORS) == set(KNOWN_OPS)

NASNet = Genotype(
    normal=[
        ("sep_conv_5x5", 1), ("sep_conv_3x3", 0),
        ("sep_conv_5x5", 0), ("sep_conv_3x3", 0),
        ("avg_pool_3x3", 1), ("skip_connect", 0),
        ("avg_pool_3x3", 0), ("avg_pool_3x3", 0),
        ("sep_conv_3x3", 1), ("skip_connect", 1),
    ],
    normal_concat=[2, 3, 4, 5, 6],
    reduce=[
        ("sep_conv_5x5", 1), ("sep_conv_7x7", 0),
        ("max_pool_3x3", 1), ("sep_conv_7x7", 0),
        ("avg_pool_3x3", 1), ("sep_conv_5x5", 0),
        ("skip_connect", 3), ("avg_pool_3x3", 2),
        ("sep_conv_3x3", 2), ("max_pool_3x3", 1),
    ],
    reduce_concat=[4, 5, 6],
)

AmoebaNet = Genotype(
    normal=[
        ("avg_pool_3x3", 0), ("max_pool_3x3", 1),
        ("sep_conv_3x3", 0), ("sep_conv_5x5", 2),
        ("sep_conv_3x3", 0), ("avg_pool_3x3", 3),
        ("sep_conv_3x3", 1), ("skip_connect", 1),
        ("skip_connect", 0), ("avg_pool_3x3", 1),
    ],
    normal_concat=[4, 5, 6],
    reduce=[
        ("avg_pool_3x3", 0), ("sep_conv_3x3", 1),
        ("max_pool_3x3", 0), ("sep_conv_7x7", 2),
        ("sep_conv_7x7", 0), ("avg_pool_3x3", 1),
        ("max_pool_3x3", 0), ("max_pool_3x3", 1),
        ("conv_7x1_1x7", 0), ("sep_conv_3x3", 5),
    ],
    reduce_concat=[3, 4, 6],
)

DARTS_V1 = Genotype(
    normal=[
        ("sep_conv_3x3", 1), ("sep_conv_3x3", 0),
        ("skip_connect", 0), ("sep_conv_3x3", 1),
        ("skip_connect", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0), ("skip_connect", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0), ("max_pool_3x3", 1),
        ("skip_connect", 2), ("max_pool_3x3", 0),
        ("max_pool_3x3", 0), ("skip_connect", 2),
        ("skip_connect", 2), ("avg_pool_3x3", 0),
    ],
    reduce_concat=[2, 3, 4, 5],
)

DARTS_V2 = Genotype(
    normal=[
        ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1), ("skip_connect", 0),
        ("skip_connect", 0), ("dil_conv_3x3", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0), ("max_pool_3x3", 1),
        ("skip_connect", 2), ("max_pool_3x3", 1),
        ("max_pool_3x3", 0), ("skip_connect", 2),
        ("skip_connect", 2), ("max_pool_3x3", 1),
    ],
    reduce_concat=[2, 3, 4, 5],
)

DARTS = DARTS_V2

PDARTS = Genotype(
    normal=[
        ("skip_connect", 0), ("dil_conv_3x3", 1),
        ("skip_connect", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1), ("sep_conv_3x3", 3),
        ("sep_conv_3x3", 0), ("dil_conv_5x5", 4),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("avg_pool_3x3", 0), ("sep_conv_5x5", 1),
        ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
        ("max_pool_3x3", 0), ("dil_conv_3x3", 1),
        ("dil_conv_3x3", 1), ("dil_conv_5x5", 3),
    ],
    reduce_concat=[2, 3, 4, 5],
)


def known_genotypes() -> list[str]:
    """Names of the cells defined in this module (``DARTS`` is an alias of ``DARTS_V2``)."""
    return sorted(name for name, value in globals().items() if isinstance(value, Genotype))


def validate_genotype(genotype: Genotype, source: str = "genotype") -> Genotype:
    """Check ops, pair counts, input indices and concat lists; return a normalised copy
    (tuples for pairs, lists for concat) or raise GenotypeError."""
    fields = {}
    for kind in ("normal", "reduce"):
        pairs = getattr(genotype, kind)
        if not isinstance(pairs, (list, tuple)) or len(pairs) < 2 or len(pairs) % 2:
            got = f"{len(pairs)} pairs" if isinstance(pairs, (list, tuple)) else repr(pairs)
            raise GenotypeError(
                f"{source}: '{kind}' must list two (op, input) pairs per intermediate node "
                f"(8 pairs for a P-DARTS cell), got {got}")
        normalised = []
        for k, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise GenotypeError(f"{source}: {kind}[{k}] must be a pair [op, input], got {pair!r}")
            op, index = pair
            if op not in KNOWN_OPS:
                raise GenotypeError(
                    f"{source}: {kind}[{k}] has unknown op {op!r}; known ops: {', '.join(KNOWN_OPS)}")
            node = k // 2
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2 + node:
                raise GenotypeError(
                    f"{source}: {kind}[{k}] feeds intermediate node {node}, whose input index "
                    f"must be an integer in 0..{1 + node}, got {index!r}")
            normalised.append((op, index))
        steps = len(pairs) // 2
        concat = getattr(genotype, kind + "_concat")
        # Integers only, as the pairs' inputs: 2.7 is refused, not silently taken as 2.
        if not isinstance(concat, (list, tuple)) or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in concat):
            raise GenotypeError(f"{source}: '{kind}_concat' must be a list of integer node "
                                f"indices, got {concat!r}")
        concat = list(concat)
        if not concat or any(not 0 <= c < 2 + steps for c in concat):
            raise GenotypeError(
                f"{source}: '{kind}_concat' must list node indices in 0..{1 + steps}, got {concat}")
        if all(c < 2 for c in concat):
            raise GenotypeError(
                f"{source}: '{kind}_concat' {concat} lists only the cell's inputs (0 and 1), so "
                f"none of its operations would reach the output; list intermediate nodes "
                f"(2..{1 + steps}; a P-DARTS cell uses [2, 3, 4, 5])")
        repeated = sorted({c for c in concat if concat.count(c) > 1})
        if repeated:
            raise GenotypeError(f"{source}: '{kind}_concat' {concat} lists node(s) "
                                f"{', '.join(map(str, repeated))} more than once; list each once")
        # A dead node: computed (its ops hold weights) but reaching neither the output nor
        # a node that does; the cells a search derives have none.
        live, stack = set(), [c for c in concat if c >= 2]
        while stack:
            node = stack.pop()
            if node not in live:
                live.add(node)
                stack += [i for _, i in normalised[2 * (node - 2):2 * (node - 1)] if i >= 2]
        dead = [n for n in range(2, 2 + steps) if n not in live]
        if dead:
            raise GenotypeError(
                f"{source}: {kind} node(s) {', '.join(map(str, dead))} (pairs "
                f"{', '.join(f'{2 * (n - 2)}-{2 * (n - 2) + 1}' for n in dead)}) reach neither "
                f"'{kind}_concat' {concat} nor a node in it; add them to the concat list or "
                f"remove their pairs (a P-DARTS cell: 8 pairs, concat [2, 3, 4, 5])")
        fields[kind] = normalised
        fields[kind + "_concat"] = concat
    return Genotype(**fields)


def genotype_to_dict(genotype: Genotype) -> dict[str, Any]:
    return {
        "normal": [[op, int(i)] for op, i in genotype.normal],
        "normal_concat": [int(c) for c in genotype.normal_concat],
        "reduce": [[op, int(i)] for op, i in genotype.reduce],
        "reduce_concat": [int(c) for c in genotype.reduce_concat],
    }


def genotype_from_dict(data: Any, source: str = "genotype") -> Genotype:
    if not isinstance(data, dict):
        raise GenotypeError(f"{source}: expected a JSON object with keys normal, normal_concat, "
                            "reduce, reduce_concat")
    missing = [k for k in Genotype._fields if k not in data]
    if missing:
        raise GenotypeError(f"{source}: missing key(s) {', '.join(missing)}")
    return validate_genotype(Genotype(**{k: data[k] for k in Genotype._fields}), source)


def save_genotype(genotype: Genotype, path: str) -> None:
    """Write a genotype as JSON (atomically: temp file, then rename; a failed write is a
    one-line StorageError)."""
    write_json_atomic(genotype_to_dict(genotype), path)


def load_genotype_file(path: str) -> Genotype:
    try:
        with open(path, encoding="utf-8") as f:
            data = load_json(f)
    except UnicodeDecodeError:
        raise GenotypeError(f"{path} is not a genotype JSON file (it is not text); pass the "
                            f"{GENOTYPE} a search wrote, or a cell name") from None
    except OSError as e:
        raise GenotypeError(f"cannot read genotype file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise GenotypeError(f"{path} is not valid JSON ({e})") from None
    return genotype_from_dict(data, source=path)


def get_genotype(name_or_path: str) -> Genotype:
    """Look a cell up by name (``PDARTS``, any case) or read it from a genotype JSON file or
    a search run folder (its genotype.json). Never eval."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, GENOTYPE)
        if not os.path.isfile(path):
            raise GenotypeError(
                f"{name_or_path} is a folder without {GENOTYPE}: a search run folder holds "
                "it once the search has finished; or pass a genotype JSON file or a cell name "
                f"({', '.join(known_genotypes())})")
        return load_genotype_file(path)
    if name_or_path.endswith(".json") or os.path.sep in name_or_path or os.path.isfile(name_or_path):
        return load_genotype_file(name_or_path)
    by_lower = {name.lower(): name for name in known_genotypes()}
    name = by_lower.get(name_or_path.lower())
    if name is None:
        close = difflib.get_close_matches(name_or_path.lower(), list(by_lower), n=1, cutoff=0.6)
        hint = f"did you mean {by_lower[close[0]]}? " if close else ""
        raise GenotypeError(
            f"unknown genotype {name_or_path!r}: {hint}use one of {', '.join(known_genotypes())}, "
            f"a genotype JSON file or a search run folder (its {GENOTYPE})")
    return validate_genotype(globals()[name], name)


def genotype_differences(a: Genotype, b: Genotype, limit: int = 4) -> list[str]:
    """Where cell ``a`` differs from cell ``b``: '{kind}[k] (op, input) vs (op, input)' per
    pair, and the concat lists ([] when they are the same cell); at most ``limit`` items
    and a count of the others."""
    parts = []
    for kind in ("normal", "reduce"):
        pa, pb = [tuple(p) for p in getattr(a, kind)], [tuple(p) for p in getattr(b, kind)]
        if len(pa) != len(pb):
            parts.append(f"{kind}: {len(pa)} pairs vs {len(pb)}")
        else:
            parts += [f"{kind}[{k}] {x} vs {y}" for k, (x, y) in enumerate(zip(pa, pb)) if x != y]
        ca, cb = list(getattr(a, kind + "_concat")), list(getattr(b, kind + "_concat"))
        if ca != cb:
            parts.append(f"{kind}_concat {ca} vs {cb}")
    return parts[:limit] + ([f"and {len(parts) - limit} more"] if len(parts) > limit else [])


def check_same_cell(given: Genotype, recorded: Genotype, arch: str, source: str) -> None:
    """A GenotypeError when ``--arch`` (``given``) is not the cell ``source`` (a training
    checkpoint) records: the weights were trained with that cell, and another wiring of
    the same ops loads without a complaint and computes something else."""
    differences = genotype_differences(given, recorded)
    if differences:
        raise GenotypeError(
            f"--arch {arch} is not the cell {source} was trained with; they differ in "
            f"{', '.join(differences)} (--arch vs the checkpoint's). The checkpoint records "
            "its cell: drop --arch")


def format_genotype(genotype: Genotype) -> str:
    """The ``Genotype(...)`` line that can be pasted into this module."""
    g = genotype_to_dict(genotype)
    normal = ", ".join(f"('{op}', {i})" for op, i in g["normal"])
    reduce = ", ".join(f"('{op}', {i})" for op, i in g["reduce"])
    return (f"Genotype(normal=[{normal}], normal_concat={g['normal_concat']}, "
            f"reduce=[{reduce}], reduce_concat={g['reduce_concat']})")


# ---------------------------------------------------------------------------------------
# Saved alphas (arch_state.json): one check for every reader (runs.read_arch_state for
# plots and reports, model_search.replay_stages for --derive)
# ---------------------------------------------------------------------------------------

# The search holds its alphas in float32; a saved value beyond its range (1e39 is valid
# JSON) becomes infinity in the softmax and NaN weights, which rank as nothing does.
FLOAT32_MAX = 3.4028234663852886e38


def alpha_rows_problem(rows: Any, widths: Sequence[int]) -> str | None:
    """Why ``rows`` are not saved alphas of one cell (None when they are): a list of
    ``len(widths)`` rows (one per edge), row e holding ``widths[e]`` numbers (one per op
    switched on, in PRIMITIVES order), each finite and within float32's range. true and
    false are not numbers here (JSON has them; Python would take them as 1 and 0)."""
    if not isinstance(rows, list) or len(rows) != len(widths):
        return (f"must be {len(widths)} rows (one per edge), got "
                f"{f'{len(rows)} rows' if isinstance(rows, list) else json.dumps(rows)[:40]}")
    for e, (row, width) in enumerate(zip(rows, widths)):
        if not isinstance(row, list) or len(row) != width:
            got = f"{len(row)} values" if isinstance(row, list) else json.dumps(row)[:40]
            return (f"row {e} must hold {width} numbers (one per op switched on, PRIMITIVES "
                    f"order), got {got}")
        for v in row:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"row {e} holds {json.dumps(v)[:40]}, not a number"
            if isinstance(v, float) and not math.isfinite(v):
                return (f"holds non-finite values (NaN or infinity, row {e}): the search "
                        "diverged, and no cell can be derived from it")
            if not -FLOAT32_MAX <= v <= FLOAT32_MAX:   # exact for integers of any size
                shown = f"{v:.3g}" if isinstance(v, float) else f"an integer of {len(str(abs(v)))} digits"
                return (f"row {e} holds {shown}, beyond the float32 range the search computes in "
                        f"(|alpha| <= {FLOAT32_MAX:.3g}); no search writes such a value: the "
                        "file was edited or damaged")
    return None


def primitives_problem(state: Any) -> str | None:
    """Why the op list an arch_state.json names (``primitives``) is not this version's
    PRIMITIVES, the order its alpha columns and switches follow (None when it is, or when
    the file names none, as hand-made files may)."""
    names = state.get("primitives") if isinstance(state, dict) else None
    if names is None or names == PRIMITIVES:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return f"'primitives' must be a list of op names, got {json.dumps(names)[:60]}"
    unknown = [n for n in names if n not in PRIMITIVES]
    missing = [n for n in PRIMITIVES if n not in names]
    if unknown or missing or len(names) != len(PRIMITIVES):
        parts = ([f"ops this version lacks: {', '.join(unknown)}"] if unknown else []) + \
                ([f"missing: {', '.join(missing)}"] if missing else []) + \
                ([f"{len(names)} names for {len(PRIMITIVES)} ops"] if not unknown and not missing else [])
        return (f"'primitives' {json.dumps(names)} is not this version's search space ("
                f"{'; '.join(parts)}); its alphas cannot be read with this version's ops")
    return (f"'primitives' lists the ops in another order ({', '.join(names)}) than this "
            f"version ({', '.join(PRIMITIVES)}); the alpha columns would be read as other ops")
