"""Caption strategies of the training images (`caption_strategy`), as DreamBooth trainers name them:
`instanceprompt` (the template; a `name.txt` beside `name.jpg` still wins, as before), `textfile` (every image has
its `name.txt`) and `filename` (the file's stem: underscores to spaces, a trailing number dropped). `{identifier}`
and `{class_word}` are filled in every strategy."""
import re
from pathlib import Path

from ldm.util import UserError

STRATEGIES = ("instanceprompt", "textfile", "filename")
TRAILING_NUMBER = re.compile(r"[\s_\-.]*[(\[]?\d+[)\]]?$")  # "dog_03", "dog (2)", "dog-7", "dog.1"


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
        return text
    if caption_file.is_file():
        text = caption_file.read_text(encoding="utf-8").strip()
        if not text:
            raise UserError(f"{caption_file}: the caption file is empty (delete it to use the default caption)")
        return text
    if strategy == "textfile":
        raise UserError(f"{path}: caption_strategy textfile, but {caption_file.name} is missing beside it")
    return template


def fill(text: str, identifier: str, class_word: str) -> str:
    return text.replace("{identifier}", identifier).replace("{class_word}", class_word)
