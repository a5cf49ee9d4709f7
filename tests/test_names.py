"""Songs by the names people type (`names.py`): a hand-made catalog with the answers worked out
by hand, then the shipped yes_big catalog, then --mode=search and --mode=recommend by names."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import errors
import names
import yes_reader
from conftest import ROOT, run_cli

SONGS = [  # id: title, artist
    ("Firework", "Katy Perry"),  # 0
    ("Teenage Dream", "Katy Perry"),  # 1
    ("Halo", "Beyoncé"),  # 2
    ("Halo", "Depeche Mode"),  # 3: the title "Halo" is ambiguous
    ("Hey, Soul Sister", "Train"),  # 4: a comma in the title
    ("Undone - The Sweater Song", "Weezer"),  # 5: " - " in the title
    ("Undone", "The Sweater Song"),  # 6: its "title - artist" is 5's title
    ("1979", "The Smashing Pumpkins"),  # 7: digits as a title
    ("Don't Stop Believin'", "Journey"),  # 8
    ("Come As You Are", "Nirvana"),  # 9
    ("Come As You Are", "Nirvana"),  # 10: the same song twice in the catalog
]
KEYS = ["spotify:track:0aaa", "", "", "", "", "", "", "", "", "", "spotify:track:10kk"]


@pytest.fixture(scope="module")
def index() -> names.SongIndex:
    titles, artists = zip(*SONGS, strict=True)
    return names.SongIndex(titles, artists, KEYS)


@pytest.mark.parametrize(
    "typed, song",
    [
        ("Firework", 0),
        ("  FIREWORK ", 0),  # case and spacing
        ("firework - katy  perry", 0),  # "title - artist"
        ("Firework-Katy Perry", 0),  # no spaces around the hyphen: the compact form
        ("Halo - Beyonce", 2),  # accent folded: "Beyoncé"
        ("HALO-depeche mode", 3),
        ("Undone - The Sweater Song - Weezer", 5),  # " - " inside the title
        ("undone", 6),
        ("dont stop believin", 8),  # punctuation ignored (compact form)
        ("Spotify:Track:0AAA", 0),  # external key
        ("spotify:track:10kk", 10),  # the key tells the two copies apart
        (7, 7),
    ],
)
def test_resolve_finds_the_one_song(index, typed, song):
    assert index.resolve(typed, "--history") == song


@pytest.mark.parametrize(
    "typed, listed",
    [
        ("halo", "2 Halo (Beyoncé), 3 Halo (Depeche Mode)"),
        # 5's title and 6's "title - artist" are the same text:
        ("Undone - the sweater song", "5 Undone - The Sweater Song (Weezer), 6 Undone (The"),
        ("Come As You Are - Nirvana", "9 Come As You Are (Nirvana), 10 Come As You Are (Nirvana)"),
    ],
)
def test_ambiguous_names_list_every_match_with_ids(index, typed, listed):
    with pytest.raises(errors.ConfigError, match="is ambiguous") as e:
        index.resolve(typed, "--history=x")
    assert str(e.value).startswith(f"--history=x: {typed!r} is ambiguous, 2 songs match;")
    assert listed in str(e.value)


def test_unknown_names_and_ids_are_refused_with_the_closest_songs(index):
    with pytest.raises(errors.ConfigError) as e:
        index.resolve("Firewrk", "--history=Firewrk")
    assert str(e.value).startswith("--history=Firewrk: no song 'Firewrk' in the catalog; closest: ")
    assert str(e.value).split("closest: ")[1].startswith("0 Firework (Katy Perry)")
    with pytest.raises(errors.ConfigError, match="no song 'qqqq' in the catalog; closest: none"):
        index.resolve("qqqq", "--history")
    with pytest.raises(errors.DataError, match=r"f:2: song id 11 is not in the catalog \(0..10\)"):
        index.resolve(11, "f:2", errors.DataError)


def test_split_entries_quotes_ids_and_names():
    split = names.split_entries
    assert split('"Hey, Soul Sister", firework', "h") == ["Hey, Soul Sister", "firework"]
    assert split("561 651 1167, 12,Halo", "h") == [561, 651, 1167, 12, "Halo"]
    assert split(' "1979" ,1979', "h") == ["1979", 1979]  # quoted: a name; bare digits: an id
    for bad, why in [
        ("a,,b", "an empty entry (column 3)"),
        ('"Hey, Soul', "a double quote must enclose a whole entry (column 1)"),
        ('"Halo" 2', "a double quote must enclose a whole entry (column 1)"),
        ("  ", "no songs"),
    ]:
        with pytest.raises(errors.ConfigError, match=re.escape(f"--history={bad}: {why}")):
            split(bad, f"--history={bad}")


def test_parse_history_resolves_each_entry(index):
    assert index.parse_history('"Hey, Soul Sister", Firework, 2, "1979"', "h") == [4, 0, 2, 7]
    with pytest.raises(errors.ConfigError, match="song id 1979 is not in the catalog"):
        index.parse_history("Firework, 1979", "h")


def test_search_orders_exact_prefix_word_then_substring_then_typos(index):
    assert index.search("halo", 2) == [2, 3]  # both exact, the lower id first
    # "so": a title word starts with it (4 "hey, soul sister", then the longer title of 5), then
    # inside "title - artist" (6: "undone - the sweater song").
    assert index.search("so", 3) == [4, 5, 6]
    assert index.search("fire", 5)[0] == 0
    assert index.search("firewrk", 1) == [0]  # no substring: the closest spelling
    assert index.search("   ", 5) == []


def test_read_keys_refuses_bad_lines_naming_them(tmp_path):
    assert names.read_keys(str(tmp_path), 3) is None  # a Yes.com directory has none
    path = tmp_path / names.KEYS_FILE
    path.write_text("0\tspotify:track:a\n\n2\tfirework - katy perry\n")
    assert names.read_keys(str(tmp_path), 3) == ("spotify:track:a", "", "firework - katy perry")
    for text, why in [
        ("0 spotify:a\n", "1: expected 'id<TAB>key'"),
        ("0\ta\n0\tb\n", r"2: song id 0 is given twice"),
        ("0\t \n0\tb\n", "1: expected 'id<TAB>key'"),  # blank, then twice: neither passes
        ("3\ta\n", r"1: song id 3 is outside the catalog \(0..2\)"),
    ]:
        path.write_text(text)
        with pytest.raises(errors.DataError, match=f"{path}:{why}"):
            names.read_keys(str(tmp_path), 3)


@pytest.fixture(scope="module")
def yes_big() -> names.SongIndex:
    catalog = yes_reader.read_catalog(str(ROOT / "data" / "yes_big" / "song_hash.txt"))
    return names.SongIndex(catalog.titles, catalog.artists)


def test_yes_big_names(yes_big):
    # Line numbers of data/yes_big/song_hash.txt minus one, looked up with grep.
    assert yes_big.parse_history("Firework, Teenage Dream, dynamite", "h") == [5794, 451, 54]
    assert yes_big.resolve("Undone - The Sweater Song", "h") == 6048
    with pytest.raises(errors.ConfigError, match="'home' is ambiguous, 9 songs match"):
        yes_big.resolve("home", "--history")
    with pytest.raises(errors.ConfigError, match="754 Come As You Are .Nirvana., 7724 Come"):
        yes_big.resolve("come as you are - nirvana", "--history")
    assert yes_big.search("firework", 3)[0] == 5794


CLOSEST = """
import sys, names
rows = [line.split("\\t") for line in open(sys.argv[1], encoding="utf-8").read().splitlines()]
index = names.SongIndex([r[1] for r in rows], [r[2] for r in rows])
print(index.closest("Firewrk"), index.search("fire", 20))
"""


def test_closest_songs_do_not_depend_on_the_hash_seed():
    # Trigrams are kept in sets, whose order changes with PYTHONHASHSEED: ties must not.
    path = ROOT / "data" / "yes_big" / "song_hash.txt"
    answers = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        result = subprocess.run(
            [sys.executable, "-c", CLOSEST, str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        answers.add(result.stdout)
    assert len(answers) == 1


def test_search_cli_prints_matches_best_first(tmp_path):
    result = run_cli("--mode=search", "--query=firew", "--top_k=3")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["song_id", "title", "artist"]
    assert lines[1].split() == ["5794", "Firework", "Katy", "Perry"]
    assert len(lines) == 4
    result = run_cli("--mode=search")
    assert result.returncode == 2 and "--mode=search needs --query" in result.stderr
