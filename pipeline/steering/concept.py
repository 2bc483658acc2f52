"""What a latent's meaning asks a steered text to talk about: its concept words, and their tokens.

The offline explainer writes two kinds of meaning (pipeline/interpret/concepts.py):
    topic     'plants — "plants", "hes", "plant"; flowering, genus'     concept words: plants, plant
    pattern   'the word "museum" ("the museum"); also "gallery", "o"; context: national, painting'
                                                                         concept words: museum, gallery
              'the word "of" ("of the"); also "john"'                    none: it is about "of"
              'the punctuation ","', 'the word piece "g" inside words'  no concept words: nothing to steer to
A meaning of another explainer (Claude's free text) gives its quoted words, else its content words.
Concept words are English content words (>= 3 letters, no function word): the prompting baseline asks for
them, the judge looks for them, and their first tokens are what the output score measures.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Container

FUNCTION_WORDS = frozenset(  # English function words, and the words meanings are phrased with
    """a an the and or but nor so yet if then than as of to in on at for with by from into onto over under
about above below across after before between through during without within against among upon off out up
down is are was were be been being am do does did done have has had having will would shall should can
could may might must it its itself this that these those there here he him his himself she her hers herself
they them their theirs themselves we us our ours you your yours i me my mine who whom whose which what when
where why how all any both each either neither every few many much more most other another some such no not
only own same too very also just even ever still again once one mostly mainly often usually maybe perhaps
token tokens word words text like piece pieces inside punctuation context""".split()
)
_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


def is_content_word(word: str) -> bool:
    return word.isalpha() and len(word) >= 3 and word.lower() not in FUNCTION_WORDS


def _unique(words) -> list[str]:
    out: list[str] = []
    for w in words:
        w = w.strip().lower()
        if w and w not in out:
            out.append(w)
    return out


def concept_words(meaning: str, known: Container[str] | None = None) -> list[str]:
    """The meaning's concept words, lowercased, in order (see the module docstring). With `known` (a
    vocabulary of whole words, e.g. MiniLM's), a pattern's secondary words ("also ...") must be in it:
    "emphas", a word piece the explainer listed there, is no concept."""
    meaning = meaning.strip()
    if meaning.startswith(("the punctuation ", "the word piece ")):
        return []
    if meaning.startswith("the word "):  # 'the word "X" (examples); also "Y", "Z"; context: ...'
        parts = meaning.split("; ")
        head = [a or b for a, b in _QUOTED.findall(parts[0])[:1]]
        if not head or not is_content_word(head[0]):  # 'the word "of"; also "john"': about "of", not John
            return []
        also = [a or b for p in parts[1:] if p.startswith("also ") for a, b in _QUOTED.findall(p)]
        words = head + [w for w in also if known is None or w.lower() in known]
    elif " — " in meaning:  # 'topic — "tok", "tok"; context words'
        topic, rest = meaning.split(" — ", 1)
        words = re.findall(r"[A-Za-z]+", topic) + [a or b for a, b in _QUOTED.findall(rest.split("; ")[0])]
    else:
        words = [a or b for a, b in _QUOTED.findall(meaning)] or re.findall(r"[A-Za-z][A-Za-z'-]+", meaning)
    return [w for w in _unique(words) if is_content_word(w)]


def related_words(words: list[str], vectors, min_cosine: float = 0.45) -> list[str]:
    """The first concept word and those of the rest whose embedding is close to it: an explainer's secondary
    words are often other things the latent also fires on ("john; also guinea, dead"), not one concept to steer
    towards ("social; also cultural" is). vectors: list of words -> list of [d] unit vectors (MiniLM)."""
    if len(words) < 2:
        return list(words)
    v = vectors(words)
    return [words[0]] + [w for w, x in zip(words[1:], v[1:]) if float(x @ v[0]) >= min_cosine]


def concept_phrase(words: list[str], meaning: str, n_words: int = 3) -> str:
    """What the prompting baseline asks for and the judge rates against: the first concept words
    ("museum, gallery"), else the meaning itself."""
    return ", ".join(words[:n_words]) if words else meaning


def is_function_fragment(text: str) -> bool:
    """A token's text that is a function word or the start of one (" the" of " theria", " wh")."""
    low = text.strip().lower()
    return not low or any(f.startswith(low) for f in FUNCTION_WORDS)


def concept_tokens(words: list[str], tokenizer, common: frozenset[str]) -> list[int]:
    """Ids of the tokens that start the rare concept words (" word", " Word", "word"): what a continuation about
    the concept would say next. A token must read >= 3 letters and be neither a function word nor the start of
    one (" theria" starts with " the": that token says nothing of the concept). Empty unless rare words (not
    among the corpus's `common` ones) are most of the concept words."""
    rare = [w for w in words if w not in common]
    if 2 * len(rare) <= len(words):
        return []
    ids: list[int] = []
    for word in rare:
        for variant in (" " + word, " " + word.capitalize(), word):
            first = tokenizer.encode(variant, bos=False)[:1]
            text = tokenizer.decode(first) if first else ""
            if len(text.strip()) >= 3 and not is_function_fragment(text) and first[0] not in ids:
                ids.append(first[0])
    return ids


def common_words(texts: list[str], share: float = 0.02, min_count: int = 3) -> frozenset[str]:
    """Lowercased words in at least `share` of the texts and at least `min_count` of them: function
    words and the corpus's staples ("the", "from", "which"), which no concept is about."""
    counts: Counter = Counter()
    for t in texts:
        counts.update(set(re.findall(r"[a-z]+", t.lower())))
    floor = max(min_count, share * len(texts))
    return frozenset(w for w, c in counts.items() if c >= floor)
