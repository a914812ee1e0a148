"""Words bound to learned vectors (textual inversion, Gal et al. 2022, arXiv:2208.01618): each occurrence of a bound
word in a prompt's token ids gives way to the word's N vectors, as AUTOMATIC1111 does it. The tokenizer's files stay
as they are (no token is added to them), so that a run's checkpoints still fit every SD v1 tool and a prompt without
the word means what it meant before."""
from typing import Sequence, Union

COMMON_RANK = 40000  # a one-token word merged before this rank is a common word (ldm/eval/rare_tokens.py's cut)

Slot = tuple[int, int]  # (which bound word, which of its vectors)


def splice(ids: Sequence[int], words: Sequence[tuple[Sequence[int], int]]) -> list[Union[int, Slot]]:
    """A prompt's token ids with every occurrence of a bound word's ids (`words`: each word's ids and vector count)
    replaced by its vectors' slots; a longer word is matched before a shorter one."""
    order = sorted(range(len(words)), key=lambda w: -len(words[w][0]))
    items: list[Union[int, Slot]] = []
    position = 0
    while position < len(ids):
        for w in order:
            word_ids, count = words[w]
            if list(ids[position:position + len(word_ids)]) == list(word_ids):
                items += [(w, k) for k in range(count)]
                position += len(word_ids)
                break
        else:
            items.append(ids[position])
            position += 1
    return items
