"""The README and its chapters in docs/ as the tests read them: their sections, fenced code blocks and inline code
spans."""
import re

from tests.helpers.repo import REPO

FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
DOCS = REPO / "docs"


def readme() -> str:
    return REPO.joinpath("README.md").read_text()


def doc(name: str) -> str:
    """docs/<name>.md, a chapter the README links to ("toy-world" or "toy-world.md")."""
    return DOCS.joinpath(f"{name.removesuffix('.md')}.md").read_text()


def documentation() -> str:
    """The README and every docs/*.md chapter, one after the other: all the text a user reads."""
    return "\n\n".join([readme(), *(doc(path.name) for path in sorted(DOCS.glob("*.md")))])


def section(heading: str, text: str = "") -> str:
    """The text under `heading` ("## The DreamBooth workflow") up to the next heading of its level, in the README or in
    `text` (a chapter: `section("## The scorer", doc("toy-world"))`)."""
    level = heading.split(" ", 1)[0]
    return (text or readme()).split(heading, 1)[1].split(f"\n{level} ", 1)[0]


def fenced_blocks(text: str, languages: tuple[str, ...] = ("bash", "")) -> list[str]:
    """The contents of the ``` blocks whose language is one of `languages` ("" for a block with none)."""
    return [body for language, body in FENCE.findall(text) if language in languages]


def join_continuations(block: str) -> str:
    """A block with every backslash-newline continuation joined, as bash joins them."""
    return re.sub(r"\\\n\s*", "", block)


def inline_spans(text: str) -> list[str]:
    """The `inline code` spans outside fenced blocks, a line break inside a span read as a space."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", FENCE.sub("", text))]
