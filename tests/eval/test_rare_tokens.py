"""The rare-token finder: every candidate is one token of its own, short and late in the merges, sks is listed;
with a model the candidates are ranked by the prior's strength, text and fixed-seed images."""
import csv

from ldm.eval.rare_tokens import candidates, single_token_ids
from ldm.modules.encoders.modules import TOKENIZER_DIR, load_tokenizer
from tests.helpers.repo import TINY_CONFIG, load_script

find_rare_token = load_script("find_rare_token")


def test_candidates_are_single_rare_whole_word_tokens():
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    found = candidates(tokenizer, min_rank=45000, min_length=3, max_length=4)
    assert len(found) > 100
    for c in found:
        assert single_token_ids(tokenizer, c.token) == [c.rank] and c.token.isalpha()
        assert (c.rank >= 45000 and 3 <= len(c.token) <= 4) or c.token == "sks"
    assert any(c.token == "sks" and c.rank == 48136 for c in found)
    assert not any(c.token == "dog" for c in found)  # rank 1929: a common word


def test_ranking_by_a_models_prior(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "tokens.csv"
    assert find_rare_token.main(["--ckpt", str(tiny_ckpt), "--config", str(TINY_CONFIG), "--min_rank", "49000",
                                 "--samples", "1", "--top", "3", "--steps", "2", "--out", str(out),
                                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out)))
    scored = [r for r in rows if r["image_change"]]
    assert len(scored) == 4 and {r["position"] for r in scored} == {"1", "2", "3", "4"}  # the top 3, and sks
    assert [float(r["image_change"]) for r in scored] == sorted(float(r["image_change"]) for r in scored)
    text = [float(r["text_change"]) for r in rows if not r["image_change"]]
    assert text == sorted(text) and all(float(r["text_change"]) > 0 for r in rows)
    assert " sks " in capsys.readouterr().out
