from __future__ import annotations

import pytest

from cliprec.text import clean_text, extractive_summary, idf_weights, split_sentences, tokens


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("<p>Soft &amp; <b>warm</b>ness</p><br/>fleece", "Soft & warmness fleece"),
        ("&lt;br&gt;Line one&lt;br /&gt;two", "Line one two"),
        ("<script>var a = 1;</script><style>p {}</style>Text", "Text"),
        ("a < b and <3 hearts", "a < b and <3 hearts"),
        ("Café Crème für Damen – 日本製 Größe", "Café Crème für Damen – 日本製 Größe"),
        ("Élégante ✨👗 et chaude ❤️.", "Élégante et chaude."),
        ("🇯🇵 flag 👨\u200d👩\u200d👧 family 👍🏽", "flag family"),
        ("ＡＢＣ\u3000１２３", "ABC 123"),
        ("x\u00a0y  \n\t z\u200b!\x07", "x y z!"),
        ("  many    spaces\n\nand lines ", "many spaces and lines"),
        ("10° © €5", "10° © €5"),
        ("Kestrel & Co.™ quality, Acme® ℠", "Kestrel & Co. quality, Acme"),
        (None, ""),
        (12.5, "12.5"),
        ("", ""),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_clean_text_is_idempotent():
    raw = "<div>Café &amp; Crème</div>  ✨ &lt;i&gt;nice&lt;/i&gt; 日本"
    once = clean_text(raw)
    assert clean_text(once) == once == "Café & Crème nice 日本"


def test_split_sentences():
    assert split_sentences("One thing. Two things! 三。四 • five | six") == [
        "One thing.",
        "Two things!",
        "三。",
        "四",
        "five",
        "six",
    ]


def test_idf_weights_rank_rare_tokens_higher():
    idf = idf_weights(["red cotton shirt", "red wool shirt", "red silk scarf"])
    assert idf["silk"] > idf["shirt"] > idf["red"]
    assert tokens("Größe M, 日本") == ["größe", "m", "日本"]


def test_extractive_summary_starts_with_title_and_skips_duplicates():
    s = extractive_summary(
        "Men's Fleece Jacket",
        ["Men's fleece jacket", "Two zip pockets", "Two zip pockets"],
        ["Warm lining for cold mornings."],
        max_words=60,
    )
    assert s.startswith("Men's Fleece Jacket. ")
    assert s.lower().count("fleece jacket") == 1
    assert s.count("Two zip pockets") == 1
    assert "Warm lining for cold mornings." in s


def test_extractive_summary_prefers_rare_words_with_idf():
    idf = idf_weights(["soft cotton comfortable"] * 20 + ["merino wool"])
    s = extractive_summary("Sweater", ["Soft cotton comfortable", "Merino wool"], [], max_words=4, idf=idf)
    assert s == "Sweater. Merino wool."


def test_extractive_summary_caps_words():
    long_desc = [" ".join(f"word{i}" for i in range(100)) + "."]
    s = extractive_summary("Boots", ["Waterproof leather upper"], long_desc, max_words=12)
    words = s.split()
    assert len(words) == 12
    assert words[0] == "Boots."
    assert "Waterproof leather upper." in s
    assert extractive_summary(" ".join(["t"] * 30), [], [], max_words=10) == " ".join(["t"] * 10)


def test_extractive_summary_accepts_arrays():
    import numpy as np

    s = extractive_summary("Scarf", np.array(["Silk twill"], dtype=object), np.array([], dtype=object), 10)
    assert s == "Scarf. Silk twill."


def test_extractive_summary_falls_back_to_title():
    assert extractive_summary("Silk Scarf", [], [], max_words=60) == "Silk Scarf"
    assert extractive_summary("Silk Scarf", None, ["<br>"], max_words=60) == "Silk Scarf"
    # only repeats of the title: nothing to add
    assert extractive_summary("Silk Scarf", ["silk scarf!"], [], max_words=60) == "Silk Scarf"
