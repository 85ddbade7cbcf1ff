"""visualize.py: drawing cells with graphviz, and a clear message without it."""
import html
import json
import shutil

import pytest

import visualize
from genotypes import DARTS_V2, PDARTS, save_genotype

MAGIC = {"pdf": b"%PDF", "png": b"\x89PNG", "svg": b"<"}


def _need_dot():
    if shutil.which("dot") is None:
        pytest.skip("graphviz 'dot' is not installed")
    pytest.importorskip("graphviz")


def _check_outputs(out_dir, fmt):
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == sorted([f"normal.{fmt}", f"reduction.{fmt}"])  # no dot sources left
    for name in files:
        data = (out_dir / name).read_bytes()
        assert data.startswith(MAGIC[fmt]) and len(data) > 200


@pytest.mark.parametrize("fmt", ["pdf", "png"])
def test_draw_named_genotype(tmp_path, capsys, fmt):
    _need_dot()
    out = tmp_path / "figs"
    rc = visualize.main(visualize.parse_args(["PDARTS", "--format", fmt, "--out_dir", str(out)]))
    assert rc == 0
    _check_outputs(out, fmt)
    printed = capsys.readouterr().out
    assert f"normal.{fmt}" in printed and f"reduction.{fmt}" in printed


@pytest.mark.parametrize("fmt", ["pdf", "png"])
def test_draw_genotype_json(tmp_path, fmt):
    _need_dot()
    path = tmp_path / "genotype.json"
    save_genotype(DARTS_V2, str(path))
    out = tmp_path / "out"
    rc = visualize.main(visualize.parse_args([str(path), "--format", fmt, "--out_dir", str(out)]))
    assert rc == 0
    _check_outputs(out, fmt)


def test_drawing_shows_the_cell_ops(tmp_path):
    _need_dot()
    paths = visualize.draw_genotype(PDARTS, str(tmp_path), "svg")
    normal, reduction = (html.unescape(open(p).read()) for p in paths)
    assert paths[0].endswith("normal.svg") and paths[1].endswith("reduction.svg")
    assert "dil_conv_5x5" in normal and "avg_pool_3x3" not in normal
    assert "avg_pool_3x3" in reduction and "max_pool_3x3" in reduction
    for text in (normal, reduction):
        assert "c_{k-2}" in text and "c_{k}" in text


def test_default_format_is_pdf():
    args = visualize.parse_args(["PDARTS"])
    assert args.format == "pdf" and args.out_dir is None


def test_default_place_is_next_to_the_json_or_named_after_the_cell(tmp_path, monkeypatch, capsys):
    """No bare normal.pdf in the current folder that the next drawing silently replaces:
    a JSON file's cells go beside it (named after it unless it is a run's genotype.json),
    a run folder's into it, a named cell's into files named after it; each path is printed."""
    _need_dot()
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "search-run"
    run.mkdir()
    save_genotype(PDARTS, str(run / "genotype.json"))
    cells = tmp_path / "cells"
    cells.mkdir()
    save_genotype(DARTS_V2, str(cells / "mine.json"))
    cases = [(str(cells / "mine.json"), cells, "mine_"), (str(run / "genotype.json"), run, ""),
             (str(run), run, ""), ("pdarts", tmp_path, "PDARTS_"), ("DARTS_V2", tmp_path, "DARTS_V2_")]
    for source, folder, prefix in cases:
        assert visualize.main(visualize.parse_args([source])) == 0
        printed = capsys.readouterr().out
        for kind in ("normal", "reduction"):
            path = folder / f"{prefix}{kind}.pdf"
            assert path.is_file() and f"{kind} cell: {path}" in printed, (source, kind)
    assert not (tmp_path / "normal.pdf").exists()


def test_missing_dot_gives_install_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "")
    assert shutil.which("dot") is None
    rc = visualize.main(visualize.parse_args(["PDARTS", "--out_dir", str(tmp_path / "o")]))
    assert rc != 0
    assert "apt-get install graphviz" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_dot_via_which(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(visualize.shutil, "which", lambda name, *a, **k: None)
    rc = visualize.main(visualize.parse_args(["PDARTS", "--out_dir", str(tmp_path)]))
    assert rc != 0
    assert "apt-get install graphviz" in capsys.readouterr().err


def test_unknown_genotype_is_an_error(tmp_path, capsys):
    rc = visualize.main(visualize.parse_args(["NOPE", "--out_dir", str(tmp_path)]))
    assert rc != 0
    err = capsys.readouterr().err
    assert "NOPE" in err and "PDARTS" in err


def test_bad_format_is_rejected():
    with pytest.raises(SystemExit):
        visualize.parse_args(["PDARTS", "--format", "bmp"])


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    """Issue 23, item 4: --out_dir under a file (as root, a chmod'ed folder stays
    writable; a file in the way fails for everyone)."""
    _need_dot()
    (tmp_path / "file").write_text("not a folder")
    rc = visualize.main(visualize.parse_args(["PDARTS", "--out_dir", str(tmp_path / "file" / "figs")]))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cannot write the cell diagram ") and err.count("\n") == 1
    assert "choose another --out_dir" in err and "Traceback" not in err


def test_a_cell_with_a_dead_node_is_one_line(tmp_path, capsys):
    from genotypes import genotype_to_dict

    d = genotype_to_dict(PDARTS)
    d["normal"] += [["sep_conv_3x3", 0], ["skip_connect", 1]]
    path = tmp_path / "dead.json"
    path.write_text(json.dumps(d))
    rc = visualize.main(visualize.parse_args([str(path), "--out_dir", str(tmp_path / "out")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "node(s) 6" in err[0]
