"""Draw the normal and reduction cells of a genotype with graphviz.

    python visualize.py PDARTS                          # normal.pdf, reduction.pdf here
    python visualize.py run/genotype.json --format png --out_dir figures

Needs the graphviz ``dot`` program (Debian/Ubuntu: ``apt-get install graphviz``).
Never opens a viewer.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from genotypes import OP_COLORS, Genotype, GenotypeError, get_genotype, known_genotypes

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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("genotype", help=f"a cell name ({', '.join(known_genotypes())}) "
                        "or the path to a genotype JSON file")
    parser.add_argument("--format", choices=FORMATS, default="pdf", help="output format")
    parser.add_argument("--out_dir", default=".", help="folder for normal.* and reduction.*")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    try:
        genotype = get_genotype(args.genotype)
        paths = draw_genotype(genotype, args.out_dir, args.format)
    except (GenotypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
