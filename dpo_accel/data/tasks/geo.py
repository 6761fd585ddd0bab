"""The second shipped preference task: capital cities answered with one capitalised word.

Why this task: SmolLM2-135M-Instruct answers "What is the capital of Kenya?" with a sentence or a
paragraph ("The capital of Kenya is Nairobi. Nairobi is ..."), sometimes naming the wrong city. Pairs
that always prefer the bare city name ("Nairobi") over a sentence or a wrong city teach a strict output
format that is easy to check, on questions whose answers the base model mostly knows; the held-out
questions ask about countries that never appear in training, so a better score is a learned format
(and the knowledge kept), not memorised answers. Unlike the addition task, nothing here is arithmetic.

Everything is pure Python and seeded (`random.Random(seed)`): ``python scripts/make_geo_dataset.py
--out data/geo_prefs`` writes byte-identical files on every machine.

Row kinds of the rejected answer (chosen is always the capital, e.g. ``"Nairobi"``):
  wrong_word      one capitalised word, the wrong city (another country's capital)
  lowercase       the right city, not capitalised ("nairobi")
  sentence        the right city inside a sentence or a short paragraph
  sentence_wrong  a sentence naming the wrong city
"""
from __future__ import annotations

import random
import re
import unicodedata
from typing import Optional

from dpo_accel.data.tasks.common import behaviour_rates, pick_kind

# Countries whose capital is one unambiguous word (multi-word, disputed or renamed capitals left out).
CAPITALS = (
    ("Afghanistan", "Kabul"), ("Albania", "Tirana"), ("Algeria", "Algiers"), ("Angola", "Luanda"),
    ("Australia", "Canberra"), ("Austria", "Vienna"), ("Bahrain", "Manama"), ("Bangladesh", "Dhaka"),
    ("Barbados", "Bridgetown"), ("Belarus", "Minsk"), ("Belgium", "Brussels"), ("Bhutan", "Thimphu"),
    ("Botswana", "Gaborone"), ("Brazil", "Brasilia"), ("Bulgaria", "Sofia"), ("Canada", "Ottawa"),
    ("Chile", "Santiago"), ("China", "Beijing"), ("Colombia", "Bogota"), ("Croatia", "Zagreb"),
    ("Cuba", "Havana"), ("Denmark", "Copenhagen"), ("Ecuador", "Quito"), ("Egypt", "Cairo"),
    ("Eritrea", "Asmara"), ("Estonia", "Tallinn"), ("Fiji", "Suva"), ("Finland", "Helsinki"),
    ("France", "Paris"), ("Gabon", "Libreville"), ("Germany", "Berlin"), ("Ghana", "Accra"),
    ("Greece", "Athens"), ("Guinea", "Conakry"), ("Guyana", "Georgetown"), ("Honduras", "Tegucigalpa"),
    ("Hungary", "Budapest"), ("Iceland", "Reykjavik"), ("Indonesia", "Jakarta"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Ireland", "Dublin"), ("Italy", "Rome"), ("Jamaica", "Kingston"),
    ("Japan", "Tokyo"), ("Jordan", "Amman"), ("Kenya", "Nairobi"), ("Kyrgyzstan", "Bishkek"),
    ("Laos", "Vientiane"), ("Latvia", "Riga"), ("Lebanon", "Beirut"), ("Liberia", "Monrovia"),
    ("Libya", "Tripoli"), ("Lithuania", "Vilnius"), ("Madagascar", "Antananarivo"), ("Malawi", "Lilongwe"),
    ("Mali", "Bamako"), ("Malta", "Valletta"), ("Mauritania", "Nouakchott"), ("Montenegro", "Podgorica"),
    ("Morocco", "Rabat"), ("Mozambique", "Maputo"), ("Namibia", "Windhoek"), ("Nepal", "Kathmandu"),
    ("the Netherlands", "Amsterdam"), ("New Zealand", "Wellington"), ("Nicaragua", "Managua"),
    ("Niger", "Niamey"), ("Nigeria", "Abuja"), ("North Korea", "Pyongyang"), ("Norway", "Oslo"),
    ("Oman", "Muscat"), ("Pakistan", "Islamabad"), ("Peru", "Lima"), ("the Philippines", "Manila"),
    ("Poland", "Warsaw"), ("Portugal", "Lisbon"), ("Qatar", "Doha"), ("Romania", "Bucharest"),
    ("Russia", "Moscow"), ("Rwanda", "Kigali"), ("Samoa", "Apia"), ("Saudi Arabia", "Riyadh"),
    ("Senegal", "Dakar"), ("Serbia", "Belgrade"), ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"),
    ("Somalia", "Mogadishu"), ("South Korea", "Seoul"), ("Spain", "Madrid"), ("Sudan", "Khartoum"),
    ("Suriname", "Paramaribo"), ("Sweden", "Stockholm"), ("Switzerland", "Bern"), ("Syria", "Damascus"),
    ("Tajikistan", "Dushanbe"), ("Thailand", "Bangkok"), ("Tunisia", "Tunis"), ("Turkmenistan", "Ashgabat"),
    ("Uganda", "Kampala"), ("the United Kingdom", "London"), ("Uruguay", "Montevideo"),
    ("Uzbekistan", "Tashkent"), ("Venezuela", "Caracas"), ("Vietnam", "Hanoi"), ("Zambia", "Lusaka"),
    ("Zimbabwe", "Harare"),
)

PHRASINGS = (
    "What is the capital of {c}?",
    "What is the capital city of {c}?",
    "Name the capital of {c}.",
    "Which city is the capital of {c}?",
    "Tell me the capital of {c}.",
    "{c}'s capital is which city?",
    "What city is {c}'s capital?",
    "Capital of {c}?",
)

SENTENCE_TEMPLATES = (
    "The capital of {c} is {city}.",
    "The capital city of {c} is {city}.",
    "Sure! The capital of {c} is {city}.",
    "{city} is the capital of {c}.",
    "The capital of {c} is {city}. It is the largest and most important city in the country, and it is "
    "known for its history, culture and architecture.",
    "Great question! {c} is a country with a rich history, and its capital is {city}. I hope this helps!",
)

KIND_WEIGHTS = (("wrong_word", 0.3), ("lowercase", 0.1), ("sentence", 0.4), ("sentence_wrong", 0.2))
N_EVAL_COUNTRIES = 24
_FORMAT = re.compile(r"\s*([A-Z][A-Za-z'\-]*)\.?\s*")
_PROMPT = re.compile("|".join("(?:" + re.escape(p).replace(re.escape("{c}"), "(?P<c%d>.+?)" % i) + ")"
                              for i, p in enumerate(PHRASINGS)))


def fold(text: str) -> str:
    """Lower case without accents ("Bogotá" -> "bogota"), so spellings with and without accents agree."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch)).lower()


CITY_OF = {fold(country): city for country, city in CAPITALS}
ALL_CITIES = {fold(city) for _, city in CAPITALS}


def make_pair(country: str, city: str, others: list, rng: random.Random, phrasing: Optional[str] = None) -> dict:
    """One row {prompt, chosen, rejected} plus its `kind`; `others` are the cities a wrong answer picks from."""
    prompt = (phrasing or rng.choice(PHRASINGS)).format(c=country)
    prompt = prompt[0].upper() + prompt[1:]  # "the Netherlands's capital ..." starts a sentence
    kind = pick_kind(rng, KIND_WEIGHTS)
    wrong = rng.choice([o for o in others if o != city])
    if kind == "wrong_word":
        rejected = wrong
    elif kind == "lowercase":
        rejected = city.lower()
    else:
        template = rng.choice(SENTENCE_TEMPLATES)
        rejected = template.format(c=country, city=city if kind == "sentence" else wrong)
        rejected = rejected[0].upper() + rejected[1:]
    return {"prompt": prompt, "chosen": city, "rejected": rejected, "kind": kind}


def make_pairs(n_train: int = 2000, n_eval: int = 192, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows). `N_EVAL_COUNTRIES` countries are held out: eval asks only about them
    (each phrasing of each, shuffled), train never mentions them, not even as a wrong answer."""
    rng = random.Random(seed)
    countries = list(CAPITALS)
    rng.shuffle(countries)
    held_out, seen = countries[:N_EVAL_COUNTRIES], countries[N_EVAL_COUNTRIES:]
    if n_eval > len(held_out) * len(PHRASINGS):
        raise ValueError(f"at most {len(held_out) * len(PHRASINGS)} held-out rows exist; ask for fewer")
    seen_cities = [city for _, city in seen]
    train = [make_pair(*rng.choice(seen), seen_cities, rng) for _ in range(n_train)]
    grid = [(c, p) for c in held_out for p in PHRASINGS]
    rng.shuffle(grid)
    all_cities = [city for _, city in CAPITALS]
    eval_rows = [make_pair(country, city, all_cities, rng, phrasing) for (country, city), phrasing in grid[:n_eval]]
    return train, eval_rows


def write_dataset(out_dir: str, n_train: int = 2000, n_eval: int = 192, seed: int = 0) -> dict:
    """Write train.jsonl and eval.jsonl under `out_dir`; return the counts of each rejected kind."""
    from dpo_accel.outputs.files import write_pair_splits

    train, eval_ = make_pairs(n_train, n_eval, seed)
    return write_pair_splits(out_dir, {"train": train, "eval": eval_})


def capital_asked(prompt: str) -> str:
    """The capital a prompt asks for ("Capital of Kenya?" -> "Nairobi")."""
    m = _PROMPT.fullmatch(prompt.strip())
    country = next((v for v in (m.groupdict().values() if m else ()) if v), None)
    if country is None or fold(country) not in CITY_OF:
        raise ValueError(f"prompt {prompt!r} is not a capital question of the geo task")
    return CITY_OF[fold(country)]


def score_answer(prompt: str, answer: str) -> dict:
    """Score one generated answer to a capital question.

    format:  the answer is one capitalised word (letters, ' or -), an optional final period, nothing else
    correct: the first capital city of the task's table named in the answer is the one asked for
             (accents and case ignored), so "Nairobi", "nairobi" and "The capital is Nairobi." are
             correct and "Kampala, not Nairobi" is not
    """
    city = capital_asked(prompt)
    words = re.findall(r"[^\W\d_]+(?:['\-][^\W\d_]+)*", fold(answer))
    named = next((w for w in words if w in ALL_CITIES), None)
    return {"format": _FORMAT.fullmatch(answer) is not None, "correct": named == fold(city)}


def behaviour_summary(prompts: list[str], answers: list[str]) -> dict:
    """Rates over a set of generations: format_rate, correct_rate (0..1), mean_answer_words, n."""
    return behaviour_rates(prompts, answers, score_answer)
