"""The README and its chapters in docs/ hold together: every relative link and image points to a file of the
repository (and a `#anchor` to a heading of that page, as GitHub names it), every docs/*.md is linked from the README,
every figure in docs/figures/ is shown somewhere, and every docs/ page that the code, configs and tests name exists."""
import re
from pathlib import Path

from tests.helpers.readme_text import DOCS, FENCE
from tests.helpers.repo import REPO

# [text](target) and ![alt](target), with an optional "title"; the text may hold `code` but no brackets
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w/.-]+\.(?:md|png|jpg)\b")


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """`text` without its fenced blocks and inline code spans, where a link is not a link."""
    return re.sub(r"`[^`]*`", "", FENCE.sub("", text))


def links(text: str) -> list[str]:
    return LINK.findall(prose(text))


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of `text`: lower case, punctuation dropped, spaces as hyphens, a repeated
    heading numbered (-1, -2, ...)."""
    seen, names = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        names.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return names


def broken_links(page: Path, text: str) -> list[str]:
    """The links of `text` (the text of `page`) that are absolute or do not resolve inside the repository."""
    broken = []
    for target in links(text):
        if URL.match(target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve()
        if path and (target.startswith("/") or not file.is_relative_to(REPO) or not file.exists()):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and (file.suffix == ".md" or not path):
            if anchor not in anchors(file.read_text() if path else text):
                broken.append(f"{target}: no heading #{anchor} in {path or page.name}")
    return broken


def test_every_relative_link_resolves():
    found = {page.relative_to(REPO).as_posix(): links(page.read_text()) for page in pages()}
    assert sum(map(len, found.values())) > 40, found  # the links were found
    broken = {page.relative_to(REPO).as_posix(): broken_links(page, page.read_text()) for page in pages()}
    assert {page: why for page, why in broken.items() if why} == {}


def test_every_doc_is_linked_from_the_readme():
    chapters = sorted(path.name for path in DOCS.glob("*.md"))
    assert len(chapters) >= 10, chapters
    linked = {Path(target.partition("#")[0]).as_posix() for target in links((REPO / "README.md").read_text())}
    assert [name for name in chapters if f"docs/{name}" not in linked] == []


def test_every_figure_is_shown():
    figures = sorted(path.relative_to(REPO).as_posix() for path in DOCS.joinpath("figures").iterdir())
    assert figures, "docs/figures/ is empty"
    shown = {(page.parent / target).resolve().relative_to(REPO).as_posix()
             for page in pages() for target in links(page.read_text()) if not URL.match(target)}
    assert [figure for figure in figures if figure not in shown] == []


def test_every_docs_path_the_code_names_exists():
    """A message, docstring or config comment that sends the reader to docs/... names a page or figure that exists."""
    folders = ("ldm", "scripts", "configs", "tests", "tools")
    sources = [path for folder in folders for path in REPO.joinpath(folder).rglob("*")
               if path.suffix in (".py", ".yaml", ".sh", ".md")]
    sources += [REPO / name for name in ("main.py", "setup.py", "pyproject.toml", "Makefile", "README.md")]
    named = {(source.relative_to(REPO).as_posix(), path) for source in sources if source.is_file()
             for path in DOCS_PATH.findall(source.read_text(errors="replace"))}
    assert len(named) > 5, named  # the messages and comments were found
    assert sorted((source, path) for source, path in named if not (REPO / path).is_file()) == []


def test_the_link_check_finds_broken_links():
    """What the check is for: a figure left behind by a move, a chapter renamed, a heading reworded, a link that
    leaves the repository or is absolute; links in code are not links, and web addresses are not checked."""
    text = """# A page
## Its `second` heading: a, b
![a figure](figures/missing.png) [moved](no-such-chapter.md) [a heading](#no-such-heading)
[outside](../../etc/hosts) [absolute](/README.md) [a chapter's heading](toy-world.md#no-such-heading)
[fine](#its-second-heading-a-b) [fine](toy-world.md) [fine](../README.md#documentation) [fine](https://example.com/x)
`[in code](nowhere.md)`
```
[in a block](nowhere.md)
```
"""
    broken = [why.split(": ")[0] for why in broken_links(DOCS / "page.md", text)]
    assert broken == ["figures/missing.png", "no-such-chapter.md", "#no-such-heading", "../../etc/hosts", "/README.md",
                      "toy-world.md#no-such-heading"]
    assert anchors("# A\n## A\n## A") == {"a", "a-1", "a-2"}
