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
    2026-12-01      two thousand twenty six dash twelve ... December 1st 20 26
    12/03/2026      twelve slash zero three slash ...       December 3rd 20 26
    in 2025         in two thousand twenty five             in 20 25
    May 1999, 1905  May one thousand nine hundred ...       May 19 99, 19 oh 5
    9:00 am, 10:05  nine zero zero am, ten zero five        9 a.m, 10 oh 5
    9:00, 17:00     nine zero zero, seventeen zero zero     9 o'clock, 17 hundred
    10-20, 1/2      ten dash twenty, one slash two          10 to 20, 1 half
    8/10, he/she    eight tenths, he slash she              8 out of 10, he or she
    50/50, 24/7     fifty slash fifty                       50 50, 24 7
    3x, #1, ~5      three ex, hash one, tilde five          3 times, number 1, about 5
    C#, F#          C hash, F hash                          C-sharp, F-sharp
    https://www.example.com/a?b=c   H T T P S colon ...     example.com/a
    example.com/releases/v3.4.5.tar.gz  ... slash ...       example.com
    😀🎉            grinning party                          (nothing)

`read_aloud` maps each written word (whitespace-separated token) to what the voice should
read for it, so word timings still name the written words ("$5" spans "five dollars"). A token
with no such form is returned as it is; a token that reads nothing (an emoji) becomes its
punctuation alone, which keeps a clause mark's pause. Only forms that read one way are
rewritten: "30s" may be seconds or a decade and is a decade only after "the", "early", "her"
and the like; a bare "m" (meters, minutes, million) or "in" is left alone, and so is "W" (watts,
or west in "500 W Main St"); "5 g" is grams. A time needs minutes 00-59 and an hour 0-23, and
only the forms espeak misreads change (":00" and ":01"-":09"; "12:30" reads well): "3:2",
"16:9" (one-digit minutes) are ratios and stay. A 4-digit number 1100-2099 reads as a year
only where it is one: in a date, after a month ("December 3, 2026"), or after "in", "since",
"by", "year" and the like when nothing after it makes it a count ("in 2025," but not "in 2000
people"). "12/03/2026" is month/day/year (the voice is American) unless the first number
cannot be a month (then day/month/year); "12/03" alone (a date either way round, or a score)
stays. A URL reads as its host, and its path only where that is one short word. English
only: `reader_for` gives no reader for other languages.
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
# One letter is a unit as a word of its own only where nothing else is meant after a number:
# not "m" (meters, minutes, million) nor "W" (watts, or west: "500 W Main St").
_LONE_LETTER_UNITS = frozenset(("g", "L", "h", "V"))
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
# "12/03/2026": month/day/year, or day/month/year where the first cannot be a month.
_SLASHED_DATE_RE = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})")
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# --- times: "9:00", "10:05", "9am", "9:30pm"; "am" also as the next word ------------------
_AM_PM = {"am": "a.m", "a.m": "a.m", "pm": "p.m", "p.m": "p.m"}   # "a.m": letters, even alone
_CLOCK_RE = re.compile(r"(?P<hour>\d{1,2})(?::(?P<minute>[0-5]\d))?"
                       r"(?P<half>[aApP]\.?[mM]\.?)?")
_CLOCK_RANGE_RE = re.compile(r"(?P<a>[^-–]+)[-–](?P<b>[^-–]+)")   # "9:00-17:00", "9am-5pm"
# --- years: "in 2025", "May 1999", "December 3, 2026" --------------------------------------
_YEAR_RE = re.compile(r"1[1-9]\d\d|20\d\d")
_YEAR_CUES = frozenset("in since by until till from of year circa early late mid".split())
# After "in 2025 and", "from 2019 to", the next number is a year as well.
_YEAR_LINKS = frozenset("and or to through until till".split())
_MONTH_NAMES = frozenset(_MONTHS) | {k for k, v in _BEFORE_NUMBER.items() if v in _MONTHS}
# Words that may follow a year; any other ("2000 people", "1500 calories") may make it a count.
_AFTER_YEAR = frozenset((
    "and or to through until till when while after before onward onwards ago the a an this "
    "that these those there i we you he she it they was is were will would had has have as at "
    "on in for with but so if then").split())
# A year opening a sentence as its subject: "2024 was a big year", "1999 saw ...". Only 1900-2099
# ("1500 was too many" stays a count) and only before these verbs ("2000 people came" too).
_YEAR_SUBJECT_VERBS = frozenset(
    "was is will saw brought marked began ended started became proved".split())
_YEAR_PREFIX_RE = re.compile(rf"(early|mid|late|Early|Mid|Late)-({_YEAR_RE.pattern})")
_ORDINAL_DAY_RE = re.compile(r"(\d{1,2})(?:st|nd|rd|th)?")
_FRACTION_RE = re.compile(r"(\d{1,2})/(\d{1,2})")
_DENOMINATORS = {2: ("half", "halves"), 3: ("third", "thirds"), 4: ("quarter", "quarters"),
                 5: ("fifth", "fifths"), 6: ("sixth", "sixths"), 7: ("seventh", "sevenths"),
                 8: ("eighth", "eighths"), 9: ("ninth", "ninths"), 10: ("tenth", "tenths")}
# Said as a phrase, not a fraction: "twenty-four seven", "fifty-fifty", "nine eleven".
_SLASHED_PHRASES = {"24/7": "24 7", "50/50": "50 50", "9/11": "9 11"}
_TIMES_RE = re.compile(rf"(?P<n>{_NUMBER})[x×]")
_BY_RE = re.compile(r"(\d+)[x×](\d+)")
_POWER_RE = re.compile(rf"(?P<a>{_NUMBER})\^(?P<b>[-−]?\d+)")
_HASH_NUMBER_RE = re.compile(r"#(\d+)")
# "C#", "F#": a note or a language. Hyphened: espeak reads "A sharp" as the article "a".
_SHARP_RE = re.compile(r"([A-G])[#♯]")
# "and/or", "he/she", "TCP/IP": espeak reads the slash ("and slash or").
_WORD_SLASH_RE = re.compile(r"([^\W\d_]+)/([^\W\d_]+)")
# With a scheme or "www.", or a bare host of a common top-level domain with a path
# ("github.com/a/b"); a bare "example.com" reads well as it is.
_URL_RE = re.compile(r"(?:https?://|www\.)\S+|(?:[a-z0-9-]+\.)+"
                     r"(?:com|org|net|edu|gov|io|dev|ai|app|co|uk|de|me|info)/\S*",
                     re.IGNORECASE)
_URL_PREFIX_RE = re.compile(r"^(?:https?://)?(?:www\.)?", re.IGNORECASE)
_SHORT_PATH_RE = re.compile(r"[A-Za-z]{1,12}")   # "/docs", "/pricing": read after the host


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
    years: set[int] = set()   # where tokens were read as years ("from 2019 to 2025")
    for i, tok in enumerate(parts):
        prev = parts[i - 1] if i else _NONE
        nxt = parts[i + 1] if i + 1 < len(parts) else _NONE
        trail = tok.trail
        if not tok.core.isalpha() and (m := _CURRENCY_RE.fullmatch(tok.core)):
            reading, name = _currency(m, nxt.core)
        elif _is_year(parts, i, years):
            reading, name = _year(tok.core), ""
            years.add(i)
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
        return _url(core), trail
    if core in _UNITS and (len(core) > 1 or core in _LONE_LETTER_UNITS and not prev.trail) \
            and _is_number(prev.core):
        return _unit(core, prev.core), trail
    if (half := _AM_PM.get(core.lower())) and _half_after(prev, tok):
        return half, trail                         # "9:00 am": letters, whatever the case
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
    if (m := _SHARP_RE.fullmatch(core)):
        return f"{m[1]}-sharp", trail
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
    if (m := _CLOCK_RE.fullmatch(core)) and (said := _clock(m, _half_after(tok, nxt))):
        return said
    if (m := _CLOCK_RANGE_RE.fullmatch(core)) and (said := _clock_range(m[1], m[2])):
        return said
    if (m := _ISO_DATE_RE.fullmatch(core)) and (said := _date(m[1], int(m[2]), int(m[3]))):
        return said
    if (m := _SLASHED_DATE_RE.fullmatch(core)):
        first, second = int(m[1]), int(m[2])
        month, day = (second, first) if first > 12 else (first, second)   # else US order
        if (said := _date(m[3], month, day)):
            return said
    if (m := _YEAR_PREFIX_RE.fullmatch(core)):
        return f"{m[1]} {_year(m[2])}"
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
    if core in _SLASHED_PHRASES:
        return _SLASHED_PHRASES[core]
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


def _clock(m: re.Match[str], half_follows: bool) -> str | None:
    """A time's reading: "9:00" -> "9 o'clock" ("9" where "am" follows), "17:00" -> "17
    hundred", "10:05" -> "10 oh 5", "9:30pm" -> "9:30 p.m"; None where it is no time ("9"
    alone, "25:00", "13pm") or espeak reads it well as written ("0:00")."""
    hour, minute = int(m["hour"]), m["minute"]
    half = _AM_PM[m["half"].lower().rstrip(".")] if m["half"] else ""
    twelve = bool(half) or half_follows
    if not (1 <= hour <= 12 if twelve else hour <= 23) or minute is None and not twelve:
        return None
    if minute is None or minute == "00" and twelve:
        said = str(hour)
    elif minute == "00":
        said = f"{hour} o'clock" if 1 <= hour <= 12 else f"{hour} hundred" if hour else ""
    elif minute[0] == "0":
        said = f"{hour} oh {int(minute)}"
    else:
        said = f"{hour}:{minute}"
    return f"{said} {half}".strip() if said else None


def _clock_range(a: str, b: str) -> str | None:
    """"9:00-17:00" -> "9 o'clock to 17 hundred", "9-5pm" -> "9 to 5 p.m"; None unless both
    ends are times ("10-20" is a range of numbers)."""
    end = _CLOCK_RE.fullmatch(b)
    start = _CLOCK_RE.fullmatch(a)
    if not (start and end and (said_b := _clock(end, False))):
        return None
    said_a = _clock(start, bool(end["half"]) and not start["half"])
    return f"{said_a} to {said_b}" if said_a else None


def _half_after(tok: _Token, nxt: _Token) -> bool:
    """Whether nxt is "am", "p.m." ... right after the time or hour tok ("9:00 am", "9 PM")."""
    m = _CLOCK_RE.fullmatch(tok.core)
    return bool(m and not m["half"] and not tok.trail and not nxt.lead
                and nxt.core.lower() in _AM_PM and _clock(m, True))


def _date(year: str, month: int, day: int) -> str | None:
    """"December 3rd 20 26"; None where there is no such day ("2026-13-01", "02/30/2026")."""
    if not (1 <= month <= 12 and 1 <= day <= _MONTH_DAYS[month - 1]):
        return None
    return f"{_MONTHS[month - 1]} {_ordinal(day)} {_year(year)}"


def _is_year(parts: list[_Token], i: int, years: set[int]) -> bool:
    """Whether parts[i] is a year by the words around it: after a month or a month's day
    ("May 1999", "December 3rd, 2026"), or after "in", "since" ... ("in 2025", "from 2019 to
    2025") where the next word cannot make it a count ("in 2000 people" stays a number)."""
    tok = parts[i]
    if tok.lead or not _YEAR_RE.fullmatch(tok.core):
        return False
    prev, before = (parts[i - 1] if i else _NONE), (parts[i - 2] if i > 1 else _NONE)
    if _is_month(prev) or _is_month(before) and prev.trail in ("", ",") \
            and (m := _ORDINAL_DAY_RE.fullmatch(prev.core)) and 1 <= int(m[1]) <= 31:
        return True
    nxt = parts[i + 1] if i + 1 < len(parts) else _NONE
    if (not prev.core or prev.trail[-1:] in (".", "!", "?")) and not tok.trail \
            and tok.core[:2] in ("19", "20") and nxt.core.lower() in _YEAR_SUBJECT_VERBS:
        return True
    word = prev.core.lower()
    if prev.trail or not (word in _YEAR_CUES or word in _YEAR_LINKS and i - 2 in years):
        return False
    if not tok.trail and nxt.core.lower() in _YEAR_LINKS and i + 2 < len(parts) \
            and parts[i + 2].core.isdigit():
        # A range: years if its end is one ("from 2019 to 2025 we"), else counts ("from 1200
        # to 1500 meters").
        return _ends_like_a_year(parts, i + 2)
    return _ends_like_a_year(parts, i)


def _ends_like_a_year(parts: list[_Token], i: int) -> bool:
    """Whether nothing after parts[i] makes it a count: a mark, the end, or a word that may
    follow a year."""
    tok = parts[i]
    nxt = parts[i + 1] if i + 1 < len(parts) else _NONE
    return bool(_YEAR_RE.fullmatch(tok.core)) and (
        bool(tok.trail) or not nxt.core or nxt.core.lower() in _AFTER_YEAR)


def _is_month(tok: _Token) -> bool:
    """A month's name before a day or year: "May", "Dec.", "December,"; not "June." (an end)."""
    if tok.core not in _MONTH_NAMES:
        return False
    return tok.trail in ("", ",") or tok.trail == "." and tok.core not in _MONTHS


def _year(digits: str) -> str:
    """How a year is said: "2025" -> "20 25", "1999" -> "19 99", "1905" -> "19 oh 5", "1900" ->
    "19 hundred"; 2000-2009 and years outside 1100-2099 as numbers ("two thousand five")."""
    century, rest = digits[:2], int(digits[2:])
    if not _YEAR_RE.fullmatch(digits) or century == "20" and rest < 10:
        return digits
    if rest == 0:
        return f"{century} hundred"
    return f"{century} oh {rest}" if rest < 10 else f"{century} {rest}"


def _url(core: str) -> str:
    """A URL's host without "https://" and "www.", and its path only where that is one short
    word ("example.com/docs"): a long path would be read for seconds."""
    address = re.split(r"[?#]", _URL_PREFIX_RE.sub("", core), maxsplit=1)[0].rstrip("/")
    host, _, path = address.partition("/")
    return f"{host}/{path}" if _SHORT_PATH_RE.fullmatch(path) else host


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
