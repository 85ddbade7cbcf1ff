"""Genotypes (SPEC section 3): published cells, lookup, JSON files, formatting."""
import ast
import json

import pytest

import genotypes
from genotypes import (
    Genotype,
    GenotypeError,
    format_genotype,
    get_genotype,
    known_genotypes,
    save_genotype,
)

SPEC_PDARTS = Genotype(
    normal=[("skip_connect", 0), ("dil_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("dil_conv_5x5", 4)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
            ("max_pool_3x3", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1), ("dil_conv_5x5", 3)],
    reduce_concat=[2, 3, 4, 5],
)
SPEC_DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5],
)
SPEC_DARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=[2, 3, 4, 5],
)


@pytest.mark.parametrize("name,expected", [("PDARTS", SPEC_PDARTS), ("DARTS_V2", SPEC_DARTS_V2),
                                           ("DARTS_V1", SPEC_DARTS_V1), ("DARTS", SPEC_DARTS_V2)])
def test_published_cells_match_spec(name, expected):
    assert get_genotype(name) == expected
    assert getattr(genotypes, name) == expected


def test_get_genotype_pdarts_is_the_module_constant():
    g = get_genotype("PDARTS")
    assert g == genotypes.PDARTS
    assert isinstance(g, Genotype)


def test_known_genotypes():
    names = known_genotypes()
    for name in ("PDARTS", "DARTS", "DARTS_V1", "DARTS_V2", "NASNet", "AmoebaNet"):
        assert name in names


def test_unknown_name_lists_known_names():
    with pytest.raises(GenotypeError) as info:
        get_genotype("PDARTS_V9")
    msg = str(info.value)
    assert "PDARTS_V9" in msg
    for name in known_genotypes():
        assert name in msg


def test_non_genotype_module_attribute_is_not_a_genotype():
    for name in ("PRIMITIVES", "json", "get_genotype", "Genotype"):
        with pytest.raises(GenotypeError):
            get_genotype(name)


@pytest.mark.parametrize("name", known_genotypes())
def test_json_round_trip(tmp_path, name):
    g = get_genotype(name)
    path = str(tmp_path / f"{name}.json")
    save_genotype(g, path)
    with open(path) as f:
        data = json.load(f)
    assert data["normal"][0] == list(g.normal[0])
    assert data["normal_concat"] == list(g.normal_concat)
    back = get_genotype(path)
    assert back == g
    assert back.normal == [tuple(p) for p in g.normal]
    assert [p for p in tmp_path.iterdir()] == [tmp_path / f"{name}.json"]  # no temp file left


def test_json_path_without_extension(tmp_path):
    path = tmp_path / "cell"
    save_genotype(genotypes.PDARTS, str(path))
    assert get_genotype(str(path)) == genotypes.PDARTS


def _good():
    return {
        "normal": [[op, i] for op, i in genotypes.PDARTS.normal],
        "normal_concat": [2, 3, 4, 5],
        "reduce": [[op, i] for op, i in genotypes.PDARTS.reduce],
        "reduce_concat": [2, 3, 4, 5],
    }


def _bad(tmp_path, data=None, text=None):
    path = tmp_path / "bad.json"
    path.write_text(text if text is not None else json.dumps(data))
    with pytest.raises(GenotypeError) as info:
        get_genotype(str(path))
    return str(info.value)


def test_reject_unknown_op(tmp_path):
    d = _good()
    d["normal"][3] = ["sep_conv_9x9", 1]
    msg = _bad(tmp_path, d)
    assert "sep_conv_9x9" in msg and "unknown op" in msg and "normal[3]" in msg


def test_reject_seven_pairs(tmp_path):
    d = _good()
    d["reduce"] = d["reduce"][:7]
    msg = _bad(tmp_path, d)
    assert "7 pairs" in msg and "reduce" in msg


def test_reject_input_out_of_range(tmp_path):
    d = _good()
    d["normal"][0] = ["sep_conv_3x3", 2]  # node 0 only sees inputs 0 and 1
    msg = _bad(tmp_path, d)
    assert "normal[0]" in msg and "0..1" in msg and "2" in msg
    d = _good()
    d["normal"][7] = ["sep_conv_3x3", 5]  # node 3 sees 0..4
    assert "0..4" in _bad(tmp_path, d)
    d = _good()
    d["reduce"][1] = ["sep_conv_3x3", -1]
    assert "reduce[1]" in _bad(tmp_path, d)


def test_reject_non_integer_input(tmp_path):
    for index in ("1", 1.0, True):
        d = _good()
        d["normal"][1] = ["sep_conv_3x3", index]
        assert "normal[1]" in _bad(tmp_path, d)


def test_reject_malformed_pair(tmp_path):
    d = _good()
    d["normal"][2] = ["sep_conv_3x3"]
    assert "normal[2]" in _bad(tmp_path, d)


def test_reject_missing_key(tmp_path):
    d = _good()
    del d["reduce_concat"]
    msg = _bad(tmp_path, d)
    assert "missing" in msg and "reduce_concat" in msg


def test_reject_bad_concat(tmp_path):
    d = _good()
    d["normal_concat"] = [2, 3, 4, 9]
    assert "normal_concat" in _bad(tmp_path, d)
    d["normal_concat"] = ["a"]
    assert "normal_concat" in _bad(tmp_path, d)


def test_reject_fractional_or_input_only_concat(tmp_path):
    d = _good()
    d["normal_concat"] = [2, 3, 4, 5.7]          # was silently taken as 5
    assert "integer node indices" in _bad(tmp_path, d)
    d["normal_concat"] = [2, 3, 4, True]
    assert "integer node indices" in _bad(tmp_path, d)
    d = _good()
    d["reduce_concat"] = [0, 1]                  # the cell's ops would reach no output
    msg = _bad(tmp_path, d)
    assert "reduce_concat" in msg and "only the cell's inputs" in msg


def test_reject_a_file_that_is_not_text(tmp_path):
    path = tmp_path / "weights.json"
    path.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\xff\xfe")   # a pickle's first bytes
    with pytest.raises(GenotypeError) as info:
        get_genotype(str(path))
    assert "is not a genotype JSON file" in str(info.value) and "weights.json" in str(info.value)


def test_names_are_case_insensitive_with_a_suggestion():
    assert get_genotype("pdarts") is not None and get_genotype("pdarts") == genotypes.PDARTS
    assert get_genotype("Darts_V1") == genotypes.DARTS_V1
    with pytest.raises(GenotypeError) as info:
        get_genotype("PDART")
    assert "did you mean PDARTS?" in str(info.value)
    with pytest.raises(GenotypeError) as info:
        get_genotype("zzzz")
    assert "did you mean" not in str(info.value)


def test_a_search_run_folder_means_its_genotype_json(tmp_path):
    run = tmp_path / "search-try-20240101-120000"
    run.mkdir()
    with pytest.raises(GenotypeError) as info:     # not finished yet: no genotype.json
        get_genotype(str(run))
    assert "without genotype.json" in str(info.value)
    save_genotype(genotypes.DARTS_V2, str(run / genotypes.GENOTYPE))
    assert get_genotype(str(run)) == genotypes.DARTS_V2


def test_reject_invalid_json(tmp_path):
    msg = _bad(tmp_path, text='{"normal": [["sep_conv_3x3", 0],')
    assert "not valid JSON" in msg and "bad.json" in msg


def test_reject_non_object(tmp_path):
    assert "JSON object" in _bad(tmp_path, [1, 2, 3])


def test_missing_file(tmp_path):
    with pytest.raises(GenotypeError, match="cannot read"):
        get_genotype(str(tmp_path / "missing.json"))


def _parse_formatted(text):
    """Parse a ``Genotype(...)`` line into a Genotype without eval."""
    assert text.startswith("Genotype(")
    tree = ast.parse("dict(" + text[len("Genotype("):], mode="eval")
    call = tree.body
    assert isinstance(call, ast.Call) and not call.args
    fields = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    return Genotype(**fields)


@pytest.mark.parametrize("name", known_genotypes())
def test_format_genotype_parses_back(name):
    g = get_genotype(name)
    text = format_genotype(g)
    assert "\n" not in text
    back = _parse_formatted(text)
    assert back == g
    assert list(back._fields) == ["normal", "normal_concat", "reduce", "reduce_concat"]


def test_format_genotype_literal():
    g = Genotype([("skip_connect", 0), ("sep_conv_3x3", 1)], [2],
                 [("max_pool_3x3", 0), ("dil_conv_5x5", 1)], [2])
    assert format_genotype(g) == (
        "Genotype(normal=[('skip_connect', 0), ('sep_conv_3x3', 1)], normal_concat=[2], "
        "reduce=[('max_pool_3x3', 0), ('dil_conv_5x5', 1)], reduce_concat=[2])")


def test_reject_dead_nodes_and_repeated_concat(tmp_path):
    """A node whose ops reach no output (10 pairs with concat [2, 3, 4, 5]) or a concat
    index listed twice was accepted by visualize.py and the training scripts."""
    d = _good()
    d["normal"] += [["sep_conv_3x3", 0], ["skip_connect", 4]]     # node 6: computed, unused
    msg = _bad(tmp_path, d)
    assert "normal node(s) 6 (pairs 8-9)" in msg and "normal_concat" in msg
    d = _good()
    d["reduce_concat"] = [2, 3, 4, 4, 5]
    msg = _bad(tmp_path, d)
    assert "'reduce_concat' [2, 3, 4, 4, 5] lists node(s) 4 more than once" in msg
    d = _good()
    d["normal"] = [["sep_conv_3x3", 0], ["sep_conv_3x3", 1]] * 4   # no node feeds another
    d["normal_concat"] = [3, 4, 5]
    assert "normal node(s) 2 (pairs 0-1)" in _bad(tmp_path, d)
    # A node outside the concat list that feeds one inside it is alive.
    d["normal"][6] = ["skip_connect", 2]
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(d))
    assert get_genotype(str(path)).normal_concat == [3, 4, 5]


@pytest.mark.parametrize("name", genotypes.known_genotypes())
def test_every_named_cell_passes_the_checks(name):
    assert genotypes.validate_genotype(getattr(genotypes, name), name) == get_genotype(name)
