"""Text cleaning and the extractive product summary.

`clean_text` choices:
- HTML: `<script>`/`<style>` blocks are removed with their content, other tags are removed (inline tags
  such as <b> without a space, block tags such as <br>/<p> become a space), entities are unescaped, and
  tags that were entity-escaped in the source (`&lt;br&gt;`, common in Amazon descriptions) are removed
  after unescaping. A tag must start with a letter, so "a < b" and "<3" survive.
- NFKC folds full-width forms, ligatures and no-break spaces; non-ASCII letters (é, ü, 日本) are kept.
- Emoji are DROPPED: in listings they are decoration ("✅ SOFT"), and each one costs CLIP's byte-level
  BPE several of its 77 tokens. Trademark signs (™ ® ℠) are dropped too; other symbols (© ° €) are kept.
- Control, private-use and invisible format characters and U+FFFD (the mark of undecodable bytes) are
  dropped; whitespace runs become one space.

`extractive_summary` takes the title and greedily adds the most informative sentences of the features
and description (see its docstring), up to `max_words` whitespace-separated words.
"""

from __future__ import annotations

import html
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

_BLOCK_CONTENT = re.compile(r"<\s*(script|style)\b[^>]*>.*?<\s*/\s*\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# Inline tags may sit inside a word ("<b>Soft</b>ness"), so they vanish; every other tag separates words.
_INLINE_TAG = re.compile(r"<\s*/?\s*(?:b|i|u|em|strong|span|font|a|sup|sub|small)\b[^<>]*>", re.IGNORECASE)
_TAG = re.compile(r"<\s*/?\s*[A-Za-z][^<>]*>")
_EMOJI = re.compile(
    "["
    "\U0001f000-\U0001faff"  # emoji, pictographs, flags (regional indicators), skin-tone modifiers
    "\u2600-\u27bf"  # misc symbols and dingbats (☀ ★ ✅ ✔ ❤)
    "\u2b00-\u2bff"  # arrows/stars block (⭐ ⬛)
    "\ufe0e\ufe0f\u20e3\u200d"  # variation selectors, keycap, zero-width joiner
    "\U000e0020-\U000e007f"  # tag characters of subdivision flags
    "]+"
)
_TRADEMARKS = str.maketrans("", "", "\u2122\u00ae\u2120")  # ™ ® ℠
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:])(?=\s|$)")
_WORD = re.compile(r"\w+")
# Sentence ends: western punctuation followed by a space, or CJK full stops (no space follows them).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\s+[•|]\s+")
_TERMINAL = tuple(".!?。！？")
# A sentence cut to fewer words than this reads as noise; the budget stays unused instead.
MIN_CUT_WORDS = 5

_STOPWORD_TEXT = """
a an and are as at be but by for from has have in is it its of on or that the this to was were will
with you your our we they them their these those which who not no can may more most so than too very
all any each also just only into over under about up out if then there here what when where how i me
my he she his her one
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def _drop_char(ch: str) -> bool:
    """Characters that carry no text: controls, surrogates, private use, invisible formatting."""
    if ch == "\ufffd":  # the replacement character marks bytes that were not valid text
        return True
    cat = unicodedata.category(ch)
    if cat in ("Cc", "Cs", "Co"):
        return not ch.isspace()
    # Keep ZWNJ: it changes the rendering of words in Persian and Indic scripts.
    return cat == "Cf" and ch != "\u200c"


def clean_text(s: object) -> str:
    """Normalise one text field: HTML stripped and unescaped, NFKC, emoji dropped, whitespace collapsed."""
    if s is None:
        return ""
    if not isinstance(s, str):
        s = str(s)
    if not s:
        return ""
    s = _BLOCK_CONTENT.sub(" ", s)
    s = _COMMENT.sub(" ", s)
    s = _INLINE_TAG.sub("", s)
    s = _TAG.sub(" ", s)
    s = html.unescape(s)
    s = _INLINE_TAG.sub("", s)
    s = _TAG.sub(" ", s)
    # Trademark signs carry no product information, and NFKC would glue "Co.™" into "Co.TM".
    s = s.translate(_TRADEMARKS)
    s = unicodedata.normalize("NFKC", s)
    if _EMOJI.search(s):
        # "chaude ❤️." must not become "chaude ." once the emoji is gone.
        s = _SPACE_BEFORE_PUNCT.sub(r"\1", _EMOJI.sub(" ", s))
    if not s.isascii():
        s = "".join(ch for ch in s if not _drop_char(ch))
    else:
        s = "".join(ch for ch in s if ch.isprintable() or ch.isspace())
    return " ".join(s.split())


def tokens(s: str) -> list[str]:
    """Lower-cased word tokens (Unicode letters and digits), the unit of the informativeness score."""
    return _WORD.findall(s.lower())


def idf_weights(documents: Iterable[str]) -> dict[str, float]:
    """Smoothed inverse document frequency, log((1 + N) / (1 + df)) + 1, of every token in the documents."""
    df: Counter[str] = Counter()
    n = 0
    for doc in documents:
        n += 1
        df.update(set(tokens(doc)))
    return {t: math.log((1 + n) / (1 + c)) + 1.0 for t, c in df.items()}


def split_sentences(text: str) -> list[str]:
    """Split cleaned text into sentences (., !, ? followed by a space; CJK full stops; bullets and pipes)."""
    return [p.strip() for p in _SENTENCE_END.split(text) if p and p.strip()]


def _terminated(sentence: str) -> str:
    return sentence if sentence.endswith(_TERMINAL) else sentence + "."


def extractive_summary(
    title: str,
    features: Iterable[str] | None,
    description: Iterable[str] | None,
    max_words: int,
    idf: Mapping[str, float] | None = None,
) -> str:
    """Title + the most informative feature/description sentences, at most `max_words` words.

    "Informative" = rarity-weighted novelty per word: a sentence's value is the summed IDF (from `idf`,
    typically `idf_weights` over the whole catalog, so catalog-wide boilerplate weighs little; 1.0 per
    token without it; tokens missing from `idf` count as the rarest) of its content tokens (not
    stopwords) that are not yet in the title or an already chosen sentence. With a word budget to fill,
    sentences are chosen greedily by value per word (the knapsack heuristic), rescoring novelty after
    each pick; ties go to the earlier sentence (features first, then description). Sentences whose
    content is mostly (> half) covered already are skipped, so the title and repeated bullets are not
    duplicated. Only sentences that fit the remaining budget are taken; when none fits, the best one is
    cut to the budget if that leaves at least MIN_CUT_WORDS words. Chosen sentences follow the title in
    the order chosen (most informative first). No usable sentence: the title alone.
    """
    title = clean_text(title)
    title_words = title.split()
    if len(title_words) >= max_words:
        return " ".join(title_words[:max_words])
    items = [*(features if features is not None else ()), *(description if description is not None else ())]
    max_idf = max(idf.values()) if idf else 1.0

    def weight(t: str) -> float:
        return idf.get(t, max_idf) if idf is not None else 1.0

    covered = {t for t in tokens(title) if t not in STOPWORDS}
    chosen = _pick(_candidates(items), covered, max_words - len(title_words), weight)
    if not chosen:
        return title
    parts = [_terminated(title)] if title else []
    text = " ".join(parts + chosen)
    return " ".join(text.split()[:max_words])


def _candidates(items: Iterable[str]) -> list[tuple[str, list[str], set[str]]]:
    """(sentence, its words, its content tokens) of every distinct sentence with content, in order."""
    candidates: list[tuple[str, list[str], set[str]]] = []
    seen_texts: set[str] = set()
    for item in items:
        for sentence in split_sentences(clean_text(item)):
            key = sentence.lower()
            if key in seen_texts:
                continue
            seen_texts.add(key)
            content = {t for t in tokens(sentence) if t not in STOPWORDS}
            if content:
                candidates.append((sentence, sentence.split(), content))
    return candidates


def _pick(
    candidates: list[tuple[str, list[str], set[str]]],
    covered: set[str],
    budget: int,
    weight: Callable[[str], float],
) -> list[str]:
    """The greedy choice of `extractive_summary`'s doc: best novelty per word first, within `budget` words."""
    covered = set(covered)
    chosen: list[str] = []
    remaining = list(range(len(candidates)))
    while remaining and budget > 0:
        best, best_score, best_fits = None, 0.0, False
        for i in remaining:
            sentence, words, content = candidates[i]
            novel = content - covered
            if len(novel) * 2 < len(content) or not novel:
                continue
            score = sum(weight(t) for t in novel) / len(words)
            fits = len(words) <= budget
            # A sentence that fits always beats one that has to be cut.
            if best is None or (fits, score) > (best_fits, best_score):
                best, best_score, best_fits = i, score, fits
        if best is None or (not best_fits and budget < MIN_CUT_WORDS):
            break
        sentence, words, content = candidates[best]
        remaining.remove(best)
        covered |= content
        if best_fits:
            chosen.append(_terminated(sentence))
            budget -= len(words)
        else:
            chosen.append(" ".join(words[:budget]))
            budget = 0
    return chosen
