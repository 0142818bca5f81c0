"""Written forms an English voice reads as a person says them (text/normalize.py)."""

from __future__ import annotations

import emoji
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming_tts.text.normalize import read_aloud, reader_for
from streaming_tts.text.phonemes import Phonemizer
from tests.test_phonemes import assert_well_formed


def read(text: str) -> str:
    return " ".join(read_aloud(text.split()))


@pytest.mark.parametrize("text, said", [
    # Currency: the name after the amount, cents as cents, scale words before the name.
    ("It costs $1,234.56 today.", "It costs 1,234 dollars and 56 cents today."),
    ("$1 or $0.99 or $1.01 or $5.00", "1 dollar or 99 cents or 1 dollar and 1 cent or 5 dollars"),
    ("$5.5 and -$5, and +€3.", "5.5 dollars and minus 5 dollars, and plus 3 euros."),
    ("That is $2.5 million.", "That is 2.5 million dollars."),
    ("($2.5M) or $5k or $3bn", "(2.5 million dollars) or 5 thousand dollars or 3 billion dollars"),
    ("£3.50, 20€ and ¥500", "3 pounds and 50 pence, 20 euros and 500 yen"),
    # Abbreviations: read out, and their dot is no sentence's end.
    ("Dr. Smith vs. Mr. Jones, etc.", "Doctor Smith versus Mister Jones, etc."),
    ("Ms. Lee and Mrs. Brown", "Miz Lee and Missus Brown"),
    ("John Smith Jr. said", "John Smith Junior said"),
    ("It was John Smith Jr. He left.", "It was John Smith Junior. He left."),
    ("in St. Louis on Main St. Then", "in Saint Louis on Main St. Then"),
    ("See No. 5 and pp. 10-12, approx. 3",
     "See number 5 and pages 10 to 12, approximately 3"),
    ("No. I won't.", "No. I won't."),
    ("Dr. at the end: Dr.", "Dr. at the end: Dr."),
    ("w/ you, w/o doubt", "with you, without doubt"),
    # Units after a number, singular for one.
    ("5 km, 1 km, 8GB, 3.5GHz, 20°C, 70 °F.",
     "5 kilometers, 1 kilometer, 8 gigabytes, 3.5 gigahertz, 20 degrees Celsius, "
     "70 degrees Fahrenheit."),
    ("5 hrs 3 secs 100ms 1h 5-10 km 60 mph",
     "5 hours 3 seconds 100 milliseconds 1 hour 5 to 10 kilometers 60 miles per hour"),
    # Single letters as a word of their own only where they name one unit: "g" grams, "L",
    # "h", "V"; "in", "m", "W" (watts or west) and unknown units stay, and so does a letter
    # after a clause mark.
    ("5 g of 5g, 6 ft 2 in, 5 m, 4K, 10 mb", "5 grams of 5 grams, 6 feet 2 in, 5 m, 4K, 10 mb"),
    ("1 g, 2 L, 24 h, 12 V, 1 L", "1 gram, 2 liters, 24 hours, 12 volts, 1 liter"),
    ("60 W bulb, 500 W Main St, 5W", "60 W bulb, 500 W Main St, 5 watts"),
    ("Step 1, g is gravity; a g, the L", "Step 1, g is gravity; a g, the L"),
    # Decades: always with a century or an apostrophe; bare only after "the", "her" ...
    ("The 1990s, the 2000s, the 1900s, the 2010s.",
     "The 19 nineties, the 2 thousands, the 19 hundreds, the 20 tens."),
    ("the 80s, her 30s, '70s, wait 30s", "the eighties, her thirties, 'seventies, wait 30s"),
    # Dates, phone numbers, ranges.
    ("On 2026-12-01, not 2026-13-01.", "On December 1st 20 26, not 2026-13-01."),
    ("2026-02-30 and 2005-06-07", "2026-02-30 and June 7th 2005"),
    # Slashed dates: month/day/year; day/month/year where the first cannot be a month.
    ("On 12/03/2026, 3/1/1999 and 13/03/2026.",
     "On December 3rd 20 26, March 1st 19 99 and March 13th 20 26."),
    ("02/30/2026, 13/13/2026, 12/03/26, 12/03 and 1/2/3",
     "02/30/2026, 13/13/2026, 12/03/26, 12/03 and 1/2/3"),
    # Years: in a date, after a month or a month's day, or after "in", "since" ... where the
    # next word cannot make the number a count.
    ("December 3rd, 2026 and May 1999, July 20, 1969. Dec. 2026",
     "December 3rd, 20 26 and May 19 99, July 20, 19 69. December 20 26"),
    ("In 2025, since 1905 and by 1900. From 2019 to 2025 the year 2010 and mid-2025",
     "In 20 25, since 19 oh 5 and by 19 hundred. From 20 19 to 20 25 the year 20 10 and mid 20 25"),
    ("in 2005, in 2000 people, of 1500 calories, 2025 was, In 2025 Apple, in 2100, in 1099.",
     "in 2005, in 2000 people, of 1500 calories, 2025 was, In 2025 Apple, in 2100, in 1099."),
    ("It ended in June. 2000 people came; 1,999 in 2,025 and 12 to 2025",
     "It ended in June. 2000 people came; 1,999 in 2,025 and 12 to 2025"),
    # A year opening a sentence as its subject (1900-2099, before "was", "saw" and the like).
    ("2024 was a big year. It ended. 1999 saw the crash! 2030 will be hot. 1500 was too many.",
     "20 24 was a big year. It ended. 19 99 saw the crash! 20 30 will be hot. 1500 was too many."),
    # A range is years only if its end is one.
    ("from 1200 to 1500 meters, from 1990 to 2000 people, from 1990 to 1995 we",
     "from 1200 to 1500 meters, from 1990 to 2000 people, from 19 90 to 19 95 we"),
    # Times: minutes 00-59 and an hour 0-23 (1-12 with am or pm); only ":00" and ":0N" change.
    ("At 9:00 am, 10:05, 12:30 and 9:00.", "At 9 a.m, 10 oh 5, 12:30 and 9 o'clock."),
    ("9am, 9:30pm, 10:05PM, 9 AM, 12 p.m. Then 7 P.M. and 09:05",
     "9 a.m, 9:30 p.m, 10 oh 5 p.m, 9 a.m, 12 p.m. Then 7 p.m. and 9 oh 5"),
    ("17:00, 23:05, 9:00-17:00, 9am-5pm, 9-5pm",
     "17 hundred, 23 oh 5, 9 o'clock to 17 hundred, 9 a.m to 5 p.m, 9 to 5 p.m"),
    # ... ratios, verses and impossible times stay, and "am" after no time is a word.
    ("3:2, 16:9, 1:1, 3:16, 25:00, 24:00, 0:00, 9:60, 13pm, 13 pm, 9-5",
     "3:2, 16:9, 1:1, 3:16, 25:00, 24:00, 0:00, 9:60, 13pm, 13 pm, 9 to 5"),
    ("I am, so am I, PM Smith, 9, am I? AM radio", "I am, so am I, PM Smith, 9, am I? AM radio"),
    ("Call 555-123-4567 or (555) 123-4567.",
     "Call 5 5 5, 1 2 3, 4 5 6 7 or (5 5 5,) 1 2 3, 4 5 6 7."),
    ("Pages 10-20, 1.5–2.5, 5-10% and 3-2.", "Pages 10 to 20, 1.5 to 2.5, 5 to 10% and 3 to 2."),
    ("COVID-19 and 100-1000", "COVID-19 and 100 to 1000"),
    # Fractions, times, powers, hashes, approximations.
    ("Take 1/2, 3/4 and 2/3; 24/7 but 9/11 and 5/4",
     "Take 1 half, 3 quarters and 2 thirds; 24 7 but 9 11 and 5/4"),
    ("a 50/50 split, 10/10, 5/5, 50/5, 40/50",
     "a 50 50 split, 10 out of 10, 5 out of 5, 50/5, 40/50"),
    ("Rated 8/10 and 4/5, on 12/25", "Rated 8 out of 10 and 4 out of 5, on 12/25"),
    # Sharps: a note or a language; other letters and lower case stay.
    ("C#, F# and A#. G♯ but H#, c#, C##, #C",
     "C-sharp, F-sharp and A-sharp. G-sharp but H#, c#, C##, #C"),
    ("and/or he/she, TCP/IP, Yes/No, A/B, w/o, km/h",
     "and or he or she, TCP IP, Yes or No, A B, without, km/h"),
    ("3x faster, 1920x1080, 3 x 4, 2^10, #1, ~5, ~5km",
     "3 times faster, 1920 by 1080, 3 times 4, 2 to the power of 10, number 1, about 5, "
     "about 5 kilometers"),
    # URLs: the address as a person reads it; emoji: nothing.
    ("See https://www.example.com/a/?b=c#d for more.", "See example.com/a for more."),
    ("(www.example.org)", "(example.org)"),
    # ... its host alone where the path is longer than one short word.
    ("https://downloads.example.com/releases/2026/12/project-name-v3.4.5-linux-x86_64.tar.gz",
     "downloads.example.com"),
    ("http://example.com/docs/intro, www.example.com/getting-started and example.com/v2.",
     "example.com, example.com and example.com."),
    ("github.com/user/repo, example.com/pricing. example.com, file.tar.gz/x, and/or",
     "github.com, example.com/pricing. example.com, file.tar.gz/x, and or"),
    ("Great job 😀🎉! 👍🏽ok", "Great job ! ok"),
])
def test_written_forms_are_read_as_said(text: str, said: str) -> None:
    assert read(text) == said


# Lower-case letters of any script; a few are also emoji ("ℹ", the information source), which
# are not read.
PLAIN = st.text(alphabet=st.characters(whitelist_categories=("Ll",)).filter(
    lambda c: not emoji.is_emoji(c)), min_size=1, max_size=12)


@settings(max_examples=200)
@given(st.lists(PLAIN, min_size=1, max_size=10))
def test_plain_words_are_left_as_they_are(words: list[str]) -> None:
    assert read_aloud(words) == words


ANY = st.text(alphabet=st.sampled_from(list("0123456789$€£-/.,x~#^%°CkmgMBsDr'():😀")),
              min_size=1, max_size=12)


@settings(max_examples=300)
@given(st.lists(ANY, min_size=1, max_size=8))
def test_one_reading_per_token_whatever_the_tokens(tokens: list[str]) -> None:
    readings = read_aloud(tokens)
    assert len(readings) == len(tokens)
    assert all(isinstance(r, str) for r in readings)


def test_only_english_has_a_reader() -> None:
    assert reader_for("en-us") is read_aloud and reader_for("en_GB") is read_aloud
    assert reader_for("de") is None and reader_for("fr-fr") is None


def test_the_voice_says_the_reading_and_words_name_what_was_written(
        default_phonemizer: Phonemizer) -> None:
    text = "Dr. Smith paid $5 for 2 km."
    literal = default_phonemizer.phonemize(text)
    said = default_phonemizer.phonemize(text, normalize=True)
    assert "dˈɑːlɚ fˈaɪv" in literal.phonemes and "fˈaɪv dˈɑːlɚz" in said.phonemes
    assert "dˈɑːktɚ." in literal.phonemes and "dˈɑːktɚ." not in said.phonemes  # no full stop
    assert "kɪlˈɑːmɪɾɚz" in said.phonemes
    assert [w.text for w in said.words] == text.split()
    assert_well_formed(said, text)


def test_the_voice_says_times_years_and_sharps_as_a_person_would(
        default_phonemizer: Phonemizer) -> None:
    text = "At 9:00 am on 12/03/2026, C# in 2025."
    literal = default_phonemizer.phonemize(text)
    said = default_phonemizer.phonemize(text, normalize=True)
    assert "nˈaɪn zˈiəɹoʊ zˈiəɹoʊ" in literal.phonemes and "zˈiəɹoʊ" not in said.phonemes
    assert "nˈaɪn ˌeɪˈɛm" in said.phonemes                        # "am" as letters
    assert "slˈæʃ" in literal.phonemes and "slˈæʃ" not in said.phonemes
    assert said.phonemes.count("twˈɛnti twˈɛnti") == 2           # 2026 and 2025 as years
    assert "hˈæʃ" in literal.phonemes and "ʃˈɑːɹp" in said.phonemes
    assert [w.text for w in said.words] == text.split()
    assert_well_formed(said, text)


def test_a_token_that_reads_nothing_is_a_word_of_no_length(default_phonemizer: Phonemizer) -> None:
    result = default_phonemizer.phonemize("Great job 🎉!", normalize=True)
    assert result.phonemes.endswith("dʒˈɑːb!")           # the "!" still ends the clause
    assert [w.text for w in result.words] == ["Great", "job", "🎉!"]
    job, emoji = result.words[1:]
    assert job.first_id < job.end_id == emoji.first_id == emoji.end_id
    with pytest.raises(ValueError, match="empty text"):
        default_phonemizer.phonemize("😀 🎉", normalize=True)


WORDS = st.sampled_from([
    "$5", "$2.5", "million", "Dr.", "Smith", "vs.", "5", "km", "8GB", "the", "1990s", "80s",
    "555-123-4567", "(555)", "123-4567", "2026-12-01", "10-20", "1/2", "3x", "#1", "~5", "😀",
    "https://example.com/a", "w/", "No.", "Jr.", "hello,", "world.", "🎉!", "9:00", "10:05",
    "am", "9pm", "in", "2025", "May", "12/03/2026", "50/50", "C#", "g",
    "https://example.com/releases/v1.2.tar.gz",
])


@settings(max_examples=60, deadline=None)
@given(st.lists(WORDS, min_size=1, max_size=10))
def test_any_mix_gives_well_formed_spans_naming_the_written_words(
        default_phonemizer: Phonemizer, words: list[str]) -> None:
    text = " ".join(words)
    try:
        result = default_phonemizer.phonemize(text, normalize=True)
    except ValueError as exc:
        assert str(exc) == "empty text" and set(words) <= {"😀", "🎉!"}
        return
    assert_well_formed(result, text)
