"""Every relative link in README.md and docs/*.md points to a file that exists, and every
`#anchor` names a heading of the file it points to (GitHub's heading ids), so moving text
between the README and docs/ cannot leave a dead link behind."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target); the target ends at the first space or ')'.
MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_LINK = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a '#' there is a shell comment, not a heading)."""
    lines, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_code = not in_code
            continue
        if not in_code:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's id of a heading: markup and punctuation dropped, lower case, spaces to '-'."""
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)   # a link keeps its text
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)                    # `, *, :, (, ), /, ', ...
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The ids of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    ids = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def links(path: Path) -> list[str]:
    found = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)     # code spans hold no links
        found += MD_LINK.findall(line) + HTML_LINK.findall(line)
    return found


def test_the_pages_exist():
    assert (ROOT / "README.md").is_file()
    assert len(PAGES) > 1, "docs/*.md is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with id #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_slug_follows_github():
    # Headings of this project whose ids other pages link to.
    assert slug("Your own images (an image folder)") == "your-own-images-an-image-folder"
    assert slug("The weight/alpha split") == "the-weightalpha-split"
    assert slug("The paper's commands") == "the-papers-commands"
    assert slug("The cell: `--arch`") == "the-cell---arch"
    assert slug("`train_cifar.py` and `train_imagenet.py`") == "train_cifarpy-and-train_imagenetpy"
