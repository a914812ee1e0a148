"""Caption strategies of the training images (`caption_strategy`), as DreamBooth trainers name them:
`instanceprompt` (the template; a `name.txt` beside `name.jpg` still wins, as before), `textfile` (every image has
its `name.txt`) and `filename` (the file's stem: underscores to spaces, a trailing number dropped). `{identifier}`
and `{class_word}` are filled in every strategy; any other brace is an error, found before training starts."""
import re
from pathlib import Path

from ldm.util import UserError

STRATEGIES = ("instanceprompt", "textfile", "filename")
TRAILING_NUMBER = re.compile(r"[\s_\-.]*[(\[]?\d+[)\]]?$")  # "dog_03", "dog (2)", "dog-7", "dog.1"
PLACEHOLDERS = ("{identifier}", "{class_word}")
BRACED = re.compile(r"\{[^{}]*\}")


def check_placeholders(text: str, source: str) -> None:
    """Refuse a caption (or template) with an unknown placeholder or an unbalanced brace, naming where it is."""
    for found in BRACED.findall(text):
        if found not in PLACEHOLDERS:
            raise UserError(f"{source}: unknown placeholder {found} in {text!r}; the known ones are "
                            f"{' and '.join(PLACEHOLDERS)}")
    if "{" in BRACED.sub("", text) or "}" in BRACED.sub("", text):
        raise UserError(f"{source}: unbalanced brace in {text!r}; placeholders are {' and '.join(PLACEHOLDERS)}")


def read_caption_file(path: Path) -> str:
    """A caption file's text, without a UTF-8 byte order mark; a file that is not UTF-8 is one line naming it."""
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}; saved as Latin-1 or Windows-1252?): save it as "
                        "UTF-8") from None


def caption_from_filename(path: Path) -> str:
    """"sks_dog_on_the_beach_03.jpg" -> "sks dog on the beach"."""
    text = TRAILING_NUMBER.sub("", re.sub(r"_(?![^{]*})", " ", path.stem)).strip()  # not inside {class_word}
    return re.sub(r"\s+", " ", text)


def caption_of(path: Path, strategy: str, template: str) -> str:
    """The caption of one image before its placeholders are filled; a one-line error names a missing caption."""
    caption_file = path.with_suffix(".txt")
    if strategy == "filename":
        text = caption_from_filename(path)
        if not text:
            raise UserError(f"{path}: caption_strategy filename, but its name gives no caption (rename it)")
        check_placeholders(text, f"{path} (its name is its caption)")
        return text
    if caption_file.is_file():
        text = read_caption_file(caption_file)
        if not text:
            raise UserError(f"{caption_file}: the caption file is empty (delete it to use the default caption)")
        check_placeholders(text, str(caption_file))
        return text
    if strategy == "textfile":
        raise UserError(f"{path}: caption_strategy textfile, but {caption_file.name} is missing beside it")
    return template


def fill(text: str, identifier: str, class_word: str) -> str:
    """The caption with its placeholders filled in."""
    return text.replace("{identifier}", identifier).replace("{class_word}", class_word)
