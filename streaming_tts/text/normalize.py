"""What an English voice should say for the written forms espeak-ng misreads.

espeak-ng reads most numbers, ordinals, times and percentages well, but an LLM's reply also
holds forms it reads wrong or letter by letter, and the listener hears them. espeak-ng reads
(left) and what is read instead (right):

    $1,234.56       dollar one thousand ... point five six  1,234 dollars and 56 cents
    $2.5 million    dollar two point five million           2.5 million dollars
    Dr. Smith       doctor, a full stop, Smith              Doctor Smith
    Ms. Jr. hrs     M S, J R, H R S                         Miz, Junior, hours
    5 km, 8GB       five K M, eight G B                     5 kilometers, 8 gigabytes
    the 1990s       nineteen hundred ninety z               19 nineties
    555-123-4567    five hundred fifty five dash ...        5 5 5, 1 2 3, 4 5 6 7
    2026-12-01      two thousand twenty six dash twelve ... December 1st 2026
    10-20, 1/2      ten dash twenty, one slash two          10 to 20, 1 half
    8/10, he/she    eight tenths, he slash she              8 out of 10, he or she
    3x, #1, ~5      three ex, hash one, tilde five          3 times, number 1, about 5
    https://www.example.com/a?b=c   H T T P S colon ...     example.com/a
    😀🎉            grinning party                          (nothing)

`read_aloud` maps each written word (whitespace-separated token) to what the voice should
read for it, so word timings still name the written words ("$5" spans "five dollars"). A token
with no such form is returned as it is; a token that reads nothing (an emoji) becomes its
punctuation alone, which keeps a clause mark's pause. Only forms that read one way are
rewritten: "30s" may be seconds or a decade and is a decade only after "the", "early", "her"
and the like; a bare "m" (meters, minutes, million) or "in" is left alone. English only:
`reader_for` gives no reader for other languages.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import emoji

# Punctuation around a word's core: kept in place around its reading, so clause marks
# ("$5," / "(Dr.") still end or open a clause.
_LEAD = "\"'“‘«([{¿¡"
_TRAIL = ".,;:!?…\"'”’»)]}"
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_NUMBER_RE = re.compile(rf"[-−+]?(?:{_NUMBER})")

# --- currency ------------------------------------------------------------------------------
# symbol -> (one, many, one subunit, many subunits); no subunit: amounts read as decimals.
_CURRENCIES = {
    "$": ("dollar", "dollars", "cent", "cents"),
    "€": ("euro", "euros", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "¥": ("yen", "yen", "", ""),
    "₹": ("rupee", "rupees", "paisa", "paise"),
}
_SCALES = {"k": "thousand", "K": "thousand", "m": "million", "M": "million", "mn": "million",
           "b": "billion", "B": "billion", "bn": "billion", "t": "trillion", "T": "trillion",
           "tn": "trillion"}
_SCALE_WORDS = frozenset(("thousand", "million", "billion", "trillion"))
_SYMBOLS = "".join(_CURRENCIES)
_SCALE_ALT = "|".join(sorted(_SCALES, key=len, reverse=True))
# "$5", "-$1,234.56", "$2.5M", "€20", and "20€" as written in much of Europe.
_CURRENCY_RE = re.compile(
    rf"(?P<sign>[-−+]?)(?:(?P<symbol>[{_SYMBOLS}])(?P<amount>{_NUMBER})(?P<scale>{_SCALE_ALT})?"
    rf"|(?P<amount_first>{_NUMBER})(?P<symbol_after>[{_SYMBOLS}]))")

# --- abbreviations -------------------------------------------------------------------------
# Before a name (the next word capitalized): the reading, and the dot is no sentence's end.
_TITLES = {
    "Dr": "Doctor", "Mr": "Mister", "Mrs": "Missus", "Ms": "Miz", "Mx": "Mix",
    "Prof": "Professor", "St": "Saint", "Gen": "General", "Capt": "Captain",
    "Lt": "Lieutenant", "Col": "Colonel", "Sgt": "Sergeant", "Rev": "Reverend",
    "Hon": "Honorable", "Gov": "Governor", "Sen": "Senator", "Rep": "Representative",
    "Mt": "Mount", "Ft": "Fort", "Pres": "President",
}
# Anywhere, with or without a dot. The dot after "Jr." and "Sr." still ends a sentence where a
# capitalized word follows ("... John Smith Jr. He said"); after the others it never does.
_MAY_END = frozenset(("Jr", "Sr"))
_ABBREVIATIONS = {"Jr": "Junior", "Sr": "Senior", "vs": "versus", "Vs": "Versus",
                  "approx": "approximately", "Approx": "Approximately", "w/": "with",
                  "W/": "With", "w/o": "without", "W/o": "Without", "W/O": "Without"}
# Before a number only ("No. 5", "pp. 10-12"): "No." alone is the word "no".
_BEFORE_NUMBER = {
    "No": "number", "no": "number", "Nos": "numbers", "nos": "numbers", "Vol": "volume",
    "vol": "volume", "Fig": "figure", "fig": "figure", "p": "page", "pp": "pages",
    "Ch": "chapter", "ch": "chapter", "Sec": "section", "sec": "section", "Art": "article",
    "Jan": "January", "Feb": "February", "Mar": "March", "Apr": "April", "Jun": "June",
    "Jul": "July", "Aug": "August", "Sep": "September", "Sept": "September", "Oct": "October",
    "Nov": "November", "Dec": "December",
}

# --- units (after a number; case as written: "MB" megabytes, "mb" is left alone) ----------
def _unit_table(rows: str) -> dict[str, tuple[str, str]]:
    """"abbreviation, singular[, plural]" rows; the plural is the singular + "s" unless given."""
    table = {}
    for row in rows.strip().splitlines():
        abbreviation, one, *many = (part.strip() for part in row.split(","))
        table[abbreviation] = (one, many[0] if many else one + "s")
    return table


_UNITS = _unit_table("""
    km, kilometer
    cm, centimeter
    mm, millimeter
    µm, micrometer
    nm, nanometer
    mi, mile
    ft, foot, feet
    kg, kilogram
    mg, milligram
    g, gram
    lb, pound
    lbs, pound, pounds
    oz, ounce
    ml, milliliter
    mL, milliliter
    L, liter
    mph, mile per hour, miles per hour
    km/h, kilometer per hour, kilometers per hour
    kph, kilometer per hour, kilometers per hour
    m/s, meter per second, meters per second
    ms, millisecond
    µs, microsecond
    ns, nanosecond
    sec, second
    secs, second, seconds
    min, minute
    mins, minute, minutes
    h, hour
    hr, hour
    hrs, hour, hours
    KB, kilobyte
    kB, kilobyte
    MB, megabyte
    GB, gigabyte
    TB, terabyte
    PB, petabyte
    KiB, kibibyte
    MiB, mebibyte
    GiB, gibibyte
    TiB, tebibyte
    kbps, kilobit per second, kilobits per second
    Kbps, kilobit per second, kilobits per second
    Mbps, megabit per second, megabits per second
    Gbps, gigabit per second, gigabits per second
    Hz, hertz, hertz
    kHz, kilohertz, kilohertz
    MHz, megahertz, megahertz
    GHz, gigahertz, gigahertz
    W, watt
    kW, kilowatt
    MW, megawatt
    Wh, watt hour
    kWh, kilowatt hour
    MWh, megawatt hour
    mAh, milliamp hour
    V, volt
    kV, kilovolt
    mA, milliamp
    °C, degree Celsius, degrees Celsius
    °F, degree Fahrenheit, degrees Fahrenheit
""")
_UNIT_ALT = "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True))
_NUMBER_UNIT_RE = re.compile(rf"(?P<number>[-−+]?(?:{_NUMBER}))(?P<unit>{_UNIT_ALT})")

# --- numbers in other shapes ---------------------------------------------------------------
_RANGE_RE = re.compile(rf"(?P<a>{_NUMBER})[-–](?P<b>{_NUMBER})(?P<percent>%?)")
_DECADES = {"1": "tens", "2": "twenties", "3": "thirties", "4": "forties", "5": "fifties",
            "6": "sixties", "7": "seventies", "8": "eighties", "9": "nineties"}
_CENTURY_DECADE_RE = re.compile(r"(?P<century>1\d|20)(?P<decade>\d)0['’]?s")
_SHORT_DECADE_RE = re.compile(r"(?P<decade>[1-9])0['’]?s")
# Words before a bare "80s" that make it a decade ("the 80s", "her 30s"), not 80 seconds.
_DECADE_CUES = frozenset("the early mid late his her their my your our its".split())
_PHONE_RE = re.compile(r"(?:\+?1[-.])?\(?(\d{3})\)?[-.](\d{3})[-.](\d{4})")
_LOCAL_PHONE_RE = re.compile(r"(\d{3})-(\d{4})")
_ISO_DATE_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_MONTHS = ("January February March April May June July August September October November "
           "December").split()
_FRACTION_RE = re.compile(r"(\d{1,2})/(\d{1,2})")
_DENOMINATORS = {2: ("half", "halves"), 3: ("third", "thirds"), 4: ("quarter", "quarters"),
                 5: ("fifth", "fifths"), 6: ("sixth", "sixths"), 7: ("seventh", "sevenths"),
                 8: ("eighth", "eighths"), 9: ("ninth", "ninths"), 10: ("tenth", "tenths")}
_TIMES_RE = re.compile(rf"(?P<n>{_NUMBER})[x×]")
_BY_RE = re.compile(r"(\d+)[x×](\d+)")
_POWER_RE = re.compile(rf"(?P<a>{_NUMBER})\^(?P<b>[-−]?\d+)")
_HASH_NUMBER_RE = re.compile(r"#(\d+)")
# "and/or", "he/she", "TCP/IP": espeak reads the slash ("and slash or").
_WORD_SLASH_RE = re.compile(r"([^\W\d_]+)/([^\W\d_]+)")
_URL_RE = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_URL_PREFIX_RE = re.compile(r"^(?:https?://)?(?:www\.)?", re.IGNORECASE)


@dataclass(frozen=True)
class _Token:
    lead: str    # opening quotes and brackets
    core: str
    trail: str   # closing punctuation: clause marks, quotes, brackets


_NONE = _Token("", "", "")


def reader_for(language: str) -> Callable[[list[str]], list[str]] | None:
    """The reader for a voice language ("en_US", "en-us"); None where none is known."""
    return read_aloud if language.lower().startswith("en") else None


def read_aloud(tokens: list[str]) -> list[str]:
    """What to read for each written token (one reading per token; see the module doc)."""
    parts = [_split(t if t.isascii() else emoji.replace_emoji(t, "")) for t in tokens]
    out: list[str] = []
    carried = ""   # a currency's name, read after its scale word ("million dollars")
    for i, tok in enumerate(parts):
        prev = parts[i - 1] if i else _NONE
        nxt = parts[i + 1] if i + 1 < len(parts) else _NONE
        trail = tok.trail
        if not tok.core.isalpha() and (m := _CURRENCY_RE.fullmatch(tok.core)):
            reading, name = _currency(m, nxt.core)
        else:
            reading, trail = _reading(tok, prev, nxt)
            name = ""
        if carried:
            reading = f"{reading} {carried}"
        carried = name
        out.append(f"{tok.lead}{reading}{trail}")
    return out


def _split(token: str) -> _Token:
    lo, hi = 0, len(token)
    while lo < hi and token[lo] in _LEAD:
        lo += 1
    while hi > lo and token[hi - 1] in _TRAIL:
        hi -= 1
    return _Token(token[:lo], token[lo:hi], token[hi:])


def _reading(tok: _Token, prev: _Token, nxt: _Token) -> tuple[str, str]:
    """(what to read for tok.core, its trailing punctuation): the core itself where it reads
    well; a trailing dot goes where it marked an abbreviation, not a sentence's end."""
    core, trail = tok.core, tok.trail
    if not core:
        return core, trail
    if _URL_RE.fullmatch(core):
        return re.split(r"[?#]", _URL_PREFIX_RE.sub("", core), maxsplit=1)[0].rstrip("/"), trail
    if len(core) > 1 and core in _UNITS and _is_number(prev.core):
        return _unit(core, prev.core), trail
    dot = trail[:1] == "." and trail[:2] != ".."
    undotted = trail[1:] if dot else trail
    if core in _TITLES and nxt.core[:1].isupper() and (core != "St" or not prev.core[:1].isupper()):
        return _TITLES[core], undotted             # "Main St. He" is a street, left as written
    if core in _ABBREVIATIONS:
        ends = not nxt.core or core in _MAY_END and nxt.core[:1].isupper()
        return _ABBREVIATIONS[core], trail if ends else undotted
    if dot and core in _BEFORE_NUMBER and nxt.core[:1].isdigit():
        return _BEFORE_NUMBER[core], undotted
    if core.isalpha() and core != "x":
        return core, trail   # most words: no shape below (numbers, a slash, "~") can fit
    if (m := _WORD_SLASH_RE.fullmatch(core)) and core not in _UNITS:
        return _slashed(m[1], m[2]), trail
    if core[0] == "~" and len(core) > 1:
        rest, trail = _reading(_Token("", core[1:], trail), prev, nxt)
        return f"about {rest}", trail
    return _number_shape(tok, prev, nxt), trail


def _number_shape(tok: _Token, prev: _Token, nxt: _Token) -> str:
    """The reading of a number written in a shape espeak misreads; else the core as is."""
    core = tok.core
    if (m := _CENTURY_DECADE_RE.fullmatch(core)):
        if m["decade"] == "0":
            return "2 thousands" if m["century"] == "20" else f"{m['century']} hundreds"
        return f"{m['century']} {_DECADES[m['decade']]}"
    if (m := _SHORT_DECADE_RE.fullmatch(core)) and (
            tok.lead[-1:] in ("'", "’") or prev.core.lower() in _DECADE_CUES):
        return _DECADES[m["decade"]]
    if (m := _ISO_DATE_RE.fullmatch(core)) and 1 <= int(m[2]) <= 12 and 1 <= int(m[3]) <= 31:
        return f"{_MONTHS[int(m[2]) - 1]} {_ordinal(int(m[3]))} {m[1]}"
    if (m := _PHONE_RE.fullmatch(core)):
        return _digits(*m.groups())
    if _is_area_code(tok) and _LOCAL_PHONE_RE.fullmatch(nxt.core):
        return _digits(core) + ","            # "(5 5 5,) 1 2 3, 4 5 6 7": a pause after it
    if _is_area_code(prev) and (m := _LOCAL_PHONE_RE.fullmatch(core)):
        return _digits(*m.groups())
    if (m := _RANGE_RE.fullmatch(core)):
        return f"{m['a']} to {m['b']}{m['percent']}"
    if (m := _NUMBER_UNIT_RE.fullmatch(core)):
        return f"{m['number']} {_unit(m['unit'], m['number'])}"
    if (m := _FRACTION_RE.fullmatch(core)):
        n, d = int(m[1]), int(m[2])
        if d in (5, 10) and 0 <= n <= d:            # a score or rating: "8/10", "4/5"
            return f"{n} out of {d}"
        if 1 <= n < d <= 10:
            return f"{n} {_DENOMINATORS[d][n != 1]}"
    if core == "24/7":
        return "24 7"
    if (m := _BY_RE.fullmatch(core)):
        return f"{m[1]} by {m[2]}"
    if (m := _TIMES_RE.fullmatch(core)):
        return f"{m['n']} times"
    if core in ("x", "×") and _is_number(prev.core) and _is_number(nxt.core):
        return "times"
    if (m := _POWER_RE.fullmatch(core)):
        return f"{m['a']} to the power of {m['b']}"
    if (m := _HASH_NUMBER_RE.fullmatch(core)):
        return f"number {m[1]}"
    return core


def _currency(m: re.Match[str], next_core: str) -> tuple[str, str]:
    """(reading of an amount, the currency's name to read after the next word, or "")."""
    sign = {"-": "minus ", "−": "minus ", "+": "plus "}.get(m["sign"], "")
    one, many, sub_one, sub_many = _CURRENCIES[m["symbol"] or m["symbol_after"]]
    amount = m["amount"] or m["amount_first"]
    if m["scale"]:
        return f"{sign}{amount} {_SCALES[m['scale']]} {many}", ""
    if next_core in _SCALE_WORDS:
        return f"{sign}{amount}", many
    whole, _, cents = amount.partition(".")
    if len(cents) == 2 and sub_many:
        units, subunits = int(whole.replace(",", "")), int(cents)
        said = [f"{whole} {one if units == 1 else many}"] if units or not subunits else []
        if subunits:
            said.append(f"{subunits} {sub_one if subunits == 1 else sub_many}")
        return sign + " and ".join(said), ""
    return f"{sign}{amount} {one if amount == '1' else many}", ""


def _slashed(a: str, b: str) -> str:
    """"he/she" -> "he or she"; acronyms ("TCP/IP", "A/B", "I/O") and "and/or" without the or."""
    if a.isupper() and b.isupper() or (a.lower(), b.lower()) == ("and", "or"):
        return f"{a} {b}"
    return f"{a} or {b}"


def _unit(unit: str, number: str) -> str:
    one, many = _UNITS[unit]
    return one if number.lstrip("-−+~") == "1" else many


def _is_number(core: str) -> bool:
    return bool(_NUMBER_RE.fullmatch(core.lstrip("~")) or _RANGE_RE.fullmatch(core))


def _is_area_code(tok: _Token) -> bool:
    """"(555)" before "123-4567"."""
    return tok.lead.endswith("(") and tok.trail.startswith(")") and len(tok.core) == 3 \
        and tok.core.isdigit()


def _digits(*groups: str) -> str:
    """Digit by digit, a pause between groups: "5 5 5, 1 2 3"."""
    return ", ".join(" ".join(group) for group in groups)


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
