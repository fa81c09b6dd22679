"""Pure-Python approximation of the COCO caption toolkit's tokenisation.

The toolkit (pycocoevalcap `PTBTokenizer`) pipes every caption through Stanford CoreNLP 3.4.1's
`PTBTokenizer -preserveLines -lowerCase` (Java) and then drops the tokens in `PUNCTUATIONS`.
`coco_tokenize` does the same without Java: `ptb_tokenize` is a small longest-match lexer modelled
on the behaviour of that jar (probed rule by rule against it), followed by the same removal list.

Reproduced quirks of the toolkit, kept because published numbers include them:
  * brackets become -LRB-/-RRB-/-LSB-/-RSB-/-LCB-/-RCB-, and -lowerCase turns them into "-lrb-" ...
    which no longer match the upper-case entries of the removal list, so they survive as words;
  * "!!", "?!" and other runs of ?/! are single tokens that are not in the list either;
  * a period stays on abbreviations ("mr.", "st.", "u.s.", "e.g.", single letters such as "a."),
    on "no./fig./pp./ca./nos." before a number, and on any word right before , ; or :;
  * contractions split PTB style: "don't" -> "do n't", "can't" -> "ca n't", "dog's" -> "dog 's",
    "cannot" -> "can not", "gonna" -> "gon na".

Known differences from the Java tokenizer (rare in captions; `tests/test_cider.py` checks plain
sentences token for token against the jar when `java` is installed):
  * only the common abbreviations are listed (CoreNLP's list is longer and partly case-sensitive);
  * no handling of SGML entities other than &amp;, of emoticons, phone numbers, or of many exotic
    Unicode symbols (CoreNLP normalises some of them, e.g. fractions beyond 1/4, 1/2, 3/4);
  * odd glue such as "dog!the" (kept whole by Java, split here) or "a,1" (Java: "a ,1");
  * quote direction (`` vs '', ` vs ') is guessed from the left context only; both forms are
    removed as punctuation, so CIDEr does not see the difference;
  * lower-casing uses Python's `str.lower`, Java uses `toLowerCase(Locale.ENGLISH)` (differs only
    for a few non-ASCII letters such as dotted capital I).
"""
import re

# The COCO toolkit's removal list, applied after lower-casing (so the bracket entries never match).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!",
                          ",", ":", "-", "--", "...", ";"])

# A period stays on these in any case ("Mr.", "mr.", "MR.").
_ABBREVIATIONS = frozenset("""
    mr mrs ms dr prof st jr sr mt ft rd ave blvd bldg inc co cos corp ltd plc pty pte ptys vs etc cf
    al seq jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
    gen gov sen rep rev capt col lt sgt cmdr adm hon pres messrs mme mlle esq bros dept univ assn
    intl sys tel est ext sq ph.d ct md mich minn mo mont neb nev okla penn tenn va vt wis wisc wyo
    ala ariz calif colo conn dak fla ga ind kan kans ky""".split())
# A period stays on these only when they are capitalised ("Mass." but not "mass.").
_CAPITALISED_ABBREVIATIONS = frozenset("la mass miss ore pa tex ill del ark wash".split())
# A period stays on these only before a number ("no. 5", "fig. 2").
_NUMBER_ABBREVIATIONS = frozenset("no nos fig pp ca".split())

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_COMPOUNDS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "lemme": 3, "gimme": 3}

_UNICODE = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2014": "--", "\u2013": "--", "\u2015": "--", "\u2012": "--", "\u2026": "...",
    "\u00a0": " ", "\u00bd": " 1/2 ", "\u00bc": " 1/4 ", "\u00be": " 3/4 ",
})

_SPECIAL = [  # tried in order before words and numbers; each match is one token
    re.compile(r"(?:https?|ftp)://[^\s\"<>()\[\]{}]*[^\s\"<>()\[\]{}.,;:!?']", re.I),
    re.compile(r"[^\W_][\w.+-]*@\w[\w-]*(?:\.\w[\w-]*)*"),  # e-mail addresses
    re.compile(r"[#@][^\W\d_]\w*"),  # hashtags and handles
    re.compile(r"</?[A-Za-z][^\s<>]*>"),  # SGML-like tags
    re.compile(r"'n'", re.I),
    re.compile(r"'t(?=(?:is|was)(?![^\W_]))", re.I),
    re.compile(r"y'(?=all(?![^\W_]))", re.I),
    re.compile(r"'(?:em|cause|\d\ds)(?![^\W_])", re.I),
    re.compile(r"(?:n't|'(?:s|re|ve|ll|d|m))(?![^\W_])", re.I),  # split-off contraction
    re.compile(r"[A-Z]+&[A-Z]+(?![^\W_])"),  # AT&T
]
_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,:/]\d+)*|\.\d+)")
_CONTRACTION_AHEAD = re.compile(r"(?:n't|'(?:s|re|ve|ll|d|m))(?![^\W_])|'n'", re.I)
_DOTS = re.compile(r"\.(?: ?\.){2,}")
_RUNS = re.compile(r"-{2,}|[?!]+|#+|\*+|``|''")


def _scan_word(s: str, i: int) -> int:
  """End of the word starting at s[i] (alphanumeric): runs joined by - / _ ', letter.letter."""
  n = len(s)
  j = i
  while True:
    start = j
    while j < n and s[j].isalnum():
      j += 1
    run = s[start:j]
    if j + 1 >= n:
      break
    # n't belongs to the next token: "don't" -> "do" + "n't".
    if s[j] == "'" and j - 1 > i and s[j - 1] in "nN" and _CONTRACTION_AHEAD.match(s, j - 1):
      return j - 1
    if s[j] == "'" and _CONTRACTION_AHEAD.match(s, j):
      break
    if s[j] in "-/_'" and s[j + 1].isalnum():
      j += 1
      continue
    # Dotted letter sequences stay whole ("mt.fuji", "u.s"); dots next to digits do not.
    if s[j] == "." and s[j + 1].isalpha() and run.isalpha():
      j += 1
      continue
    break
  # "cannot" -> "can" + "not" (only as a whole word).
  split = _COMPOUNDS.get(s[i:j].lower())
  return i + split if split else j


def _keeps_period(word: str, s: str, j: int) -> bool:
  """Whether the '.' at s[j] right after `word` stays attached to it."""
  lower = word.lower()
  if lower in _ABBREVIATIONS:
    return True
  if lower in _CAPITALISED_ABBREVIATIONS and word[0].isupper():
    return True
  if re.fullmatch(r"[^\W\d_](?:\.[^\W\d_])*", word):  # initials and acronyms: "a.", "u.s.a."
    return True
  if lower in _NUMBER_ABBREVIATIONS and re.match(r"\.\s*\d", s[j:]):
    return True
  return j + 1 < len(s) and s[j + 1] in ",;:"


def ptb_tokenize(text: str) -> list[str]:
  """PTB-style tokens of `text`, lower-cased (like PTBTokenizer -lowerCase), punctuation kept."""
  s = text.replace("&amp;", "&").translate(_UNICODE)
  tokens = []
  i, n = 0, len(s)
  while i < n:
    ch = s[i]
    if ch.isspace():
      i += 1
      continue
    tok = None
    for pattern in _SPECIAL:
      m = pattern.match(s, i)
      if m:
        tok = m.group()
        break
    if tok is None:
      num = _NUMBER.match(s, i)
      num_end = num.end() if num and (ch not in "-+" or not tokens or s[i - 1].isspace()) else i
      word_end = _scan_word(s, i) if ch.isalnum() else i
      end = max(num_end, word_end)
      if end > i:
        tok = s[i:end]
        if end < n and s[end] == "." and _keeps_period(tok, s, end):
          tok += "."
    if tok is None:
      m = _DOTS.match(s, i)
      if m:
        tokens.append("...")
        i = m.end()
        continue
      m = _RUNS.match(s, i)
      if m:
        tok = m.group()
        tokens.append("--" if tok.startswith("--") else tok)
        i = m.end()
        continue
      tok = ch
    i += len(tok)
    if tok in _BRACKETS:
      tok = _BRACKETS[tok]
    elif tok in ('"', "'"):
      opening = not tokens or s[i - 2].isspace() or s[i - 2] in "([{"
      if tok == '"':
        tok = "``" if opening else "''"
      elif opening and i < n and s[i].isalpha():
        tok = "`"
    tokens.append(tok)
  return [t.lower() for t in tokens]


def coco_tokenize(text: str) -> str:
  """The toolkit's tokenised caption: PTB tokens minus punctuation, joined by single spaces."""
  return " ".join(t for t in ptb_tokenize(text.replace("\n", " ")) if t not in PUNCTUATIONS)
