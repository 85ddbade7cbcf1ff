"""Draw the normal and reduction cells of a genotype with graphviz.

    python visualize.py PDARTS                  # PDARTS_normal.pdf, PDARTS_reduction.pdf here
    python visualize.py RUN/genotype.json       # RUN/normal.pdf, RUN/reduction.pdf (also: RUN)
    python visualize.py cells/mine.json         # cells/mine_normal.pdf, cells/mine_reduction.pdf
    python visualize.py PDARTS --format png --out_dir figures   # figures/normal.png, ...

Needs the graphviz ``dot`` program (Debian/Ubuntu: ``apt-get install graphviz``).
Never opens a viewer.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from errors import storage_error
from flags import ArgumentParser, HelpFormatter
from genotypes import OP_COLORS, Genotype, GenotypeError, get_genotype, known_genotypes
from run_files import GENOTYPE
from utils import logger

FORMATS = ("pdf", "png", "svg")
DOT_MISSING = ("the graphviz 'dot' program is not installed; install it "
               "(Debian/Ubuntu: apt-get install graphviz, macOS: brew install graphviz) "
               "to draw cells")


def graphviz_available() -> bool:
    if shutil.which("dot") is None:
        return False
    try:
        import graphviz  # noqa: F401
    except ImportError:
        return False
    return True


def plot_cell(pairs, concat, path_stem: str, fmt: str = "pdf") -> str:
    """Render one cell to ``path_stem.fmt`` and return that path."""
    import graphviz

    g = graphviz.Digraph(
        format=fmt,
        edge_attr=dict(fontsize="20", fontname="times"),
        node_attr=dict(style="filled", shape="rect", align="center", fontsize="20",
                       height="0.5", width="0.5", penwidth="2", fontname="times"),
        engine="dot",
    )
    g.body.extend(["rankdir=LR"])
    g.node("c_{k-2}", fillcolor="darkseagreen2")
    g.node("c_{k-1}", fillcolor="darkseagreen2")
    steps = len(pairs) // 2
    for i in range(steps):
        g.node(str(i), fillcolor="lightblue")
    for k, (op, j) in enumerate(pairs):
        src = {0: "c_{k-2}", 1: "c_{k-1}"}.get(j, str(j - 2))
        colour = OP_COLORS.get(op, "gray")   # the colours of plots.py's alpha plots
        g.edge(src, str(k // 2), label=op, color=colour, fontcolor=colour, penwidth="2")
    g.node("c_{k}", fillcolor="palegoldenrod")
    for j in concat:
        src = {0: "c_{k-2}", 1: "c_{k-1}"}.get(j, str(j - 2))
        g.edge(src, "c_{k}", fillcolor="gray")
    return g.render(filename=os.path.basename(path_stem), directory=os.path.dirname(path_stem) or ".",
                    view=False, cleanup=True)


def draw_genotype(genotype: Genotype, out_dir: str, fmt: str = "pdf",
                  prefix: str = "") -> list[str]:
    """Write ``{prefix}normal.{fmt}`` and ``{prefix}reduction.{fmt}`` into ``out_dir``."""
    if not graphviz_available():
        raise RuntimeError(DOT_MISSING)
    os.makedirs(out_dir, exist_ok=True)
    return [
        plot_cell(genotype.normal, genotype.normal_concat,
                  os.path.join(out_dir, f"{prefix}normal"), fmt),
        plot_cell(genotype.reduce, genotype.reduce_concat,
                  os.path.join(out_dir, f"{prefix}reduction"), fmt),
    ]


def draw_safely(genotype: Genotype, out_dir: str, prefix: str) -> None:
    """The search's diagrams (``{prefix}normal.pdf``, ``{prefix}reduction.pdf``): skipped
    without graphviz, and a failure is a warning, never the end of the search."""
    if not graphviz_available():
        logger.info("graphviz not installed: no diagram %s*.pdf", prefix)
        return
    try:
        paths = draw_genotype(genotype, out_dir, "pdf", prefix)
        logger.info("diagrams: %s", ", ".join(os.path.basename(p) for p in paths))
    except Exception as e:  # noqa: BLE001 - a drawing failure must not lose the search
        logger.warning("could not draw %s cells: %s", prefix or "final", e)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("genotype", help=f"a cell name ({', '.join(known_genotypes())}, any case), "
                        f"a genotype JSON file, or a search run folder (its {GENOTYPE})")
    parser.add_argument("--format", choices=FORMATS, default="pdf", help="output format")
    parser.add_argument("--out_dir", default=None,
                        help="write normal.FORMAT and reduction.FORMAT into this folder (default: "
                             "next to the JSON file, named after it unless it is genotype.json; "
                             "for a cell name, NAME_normal.FORMAT and NAME_reduction.FORMAT here)")
    return parser.parse_args(argv)


def output_place(source: str, out_dir: str | None) -> tuple[str, str]:
    """(folder, file-name prefix) for the diagrams of ``source`` (a cell name, a JSON file
    or a run folder): never a bare normal.pdf in the current folder that the next cell's
    drawing would silently replace."""
    if out_dir is not None:
        return out_dir, ""
    if os.path.isdir(source):
        return source, ""
    if os.path.isfile(source) or source.endswith(".json"):
        stem = os.path.splitext(os.path.basename(source))[0]
        name = os.path.splitext(GENOTYPE)[0]
        return os.path.dirname(source) or ".", "" if stem == name else f"{stem}_"
    canonical = {name.lower(): name for name in known_genotypes()}.get(source.lower(), source)
    return ".", f"{canonical}_"


def main(args: argparse.Namespace) -> int:
    out_dir, prefix = output_place(args.genotype, args.out_dir)
    try:
        genotype = get_genotype(args.genotype)
        paths = draw_genotype(genotype, out_dir, args.format, prefix)
    except (GenotypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # a folder that cannot be written (read-only, a file in the way)
        where = e.filename or os.path.join(out_dir, f"{prefix}normal.{args.format}")
        fix = "choose another --out_dir" if args.out_dir is not None else "give a writable --out_dir"
        print(f"error: {storage_error(e, where, 'the cell diagram', fix)}", file=sys.stderr)
        return 2
    for kind, p in zip(("normal", "reduction"), paths):
        print(f"{kind} cell: {os.path.abspath(p)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
