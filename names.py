"""Song names as people type them: the normal form shared by the importer and name look-up, and
the look-up itself (`SongIndex`): titles, "title - artist", catalog ids or external keys -> ids.
"""

from __future__ import annotations

import collections
import difflib
import heapq
import os
import re
import unicodedata
from collections.abc import Sequence

from errors import ConfigError, DataError

KEYS_FILE = "song_keys.txt"  # id<TAB>key per song, written by the importer (absent for Yes.com)
_ENTRY = re.compile(r'\s*(?:"(?P<quoted>[^"]*)"|(?P<plain>[^,"]*?))\s*(?P<end>,|$)')
_ID = r"[0-9]{1,4000}"  # longer: past Python's int() limit, not an id
_IDS = re.compile(rf"{_ID}(?:\s+{_ID})*")  # "54" or the old "561 651 1167"
_NOT_ALNUM = re.compile(r"[\W_]+")
SHOWN = 8  # catalog entries listed in an error
FUZZY_CANDIDATES = 64  # songs sharing the most trigrams with a typo, re-ranked by difflib


def normalize(text: str) -> str:
    """`text` folded for matching: accents removed, case folded, runs of whitespace made one space.

    "  Beyoncé   - HALO " -> "beyonce - halo". Compatibility forms are unified too (NFKD), so a
    full-width or ligature spelling matches its plain one.
    """
    if text.isascii():  # the common case, 5x faster
        return " ".join(text.casefold().split())
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(bare.casefold().split())


def song_key(title: str, artist: str) -> str:
    """The key of a song known by title and artist: "Halo", "Beyoncé" -> "halo - beyonce"."""
    return f"{normalize(title)} - {normalize(artist)}"


def compact(text: str) -> str:
    """`normalize(text)`, letters and digits only: "Don't Stop-Believin'" -> "dontstopbelievin".

    The second, looser matching form: it also ignores punctuation and where spaces go, so
    "Firework-Katy Perry" finds "Firework" by "Katy Perry".
    """
    return _alnum(normalize(text))


def _alnum(text: str) -> str:
    return _NOT_ALNUM.sub("", text)


def _trigrams(text: str) -> set[str]:
    padded = f" {text} "
    return {padded[i : i + 3] for i in range(len(padded) - 2)}


def read_keys(data_dir: str, num_songs: int) -> tuple[str, ...] | None:
    """The external keys of `data_dir`/song_keys.txt (`id<TAB>key`; "" for a song without one),
    or None if the directory has no such file (Yes.com directories).

    Raises:
      DataError naming path:line for a malformed line, an id outside the catalog or given twice.
    """
    path = os.path.join(data_dir, KEYS_FILE)
    if not os.path.exists(path):
        return None
    keys = [""] * num_songs
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            song, sep, key = line.partition("\t")
            key = key.strip()  # a blank key is no key: refused, not read as ""
            if not sep or not song.strip().isascii() or not song.strip().isdigit() or not key:
                raise DataError(f"{path}:{lineno}: expected 'id<TAB>key', got {line.rstrip()!r}")
            i = int(song)
            if i >= num_songs or keys[i]:
                why = (
                    "given twice" if i < num_songs else f"outside the catalog (0..{num_songs - 1})"
                )
                raise DataError(f"{path}:{lineno}: song id {i} is {why}")
            keys[i] = key
    return tuple(keys)


def keys_text(keys: Sequence[str]) -> str:
    """The text of a song_keys.txt (`id<TAB>key` a line, as `read_keys` reads it)."""
    return "".join(f"{i}\t{key}\n" for i, key in enumerate(keys))


def split_entries(text: str, where: str, error: type[Exception] = ConfigError) -> list[str | int]:
    """The songs of one history as typed: comma-separated, oldest first.

    An entry in double quotes is a name and may hold commas (`"Hey, Soul Sister", Firework`);
    an unquoted number is a catalog id, and unquoted numbers separated by spaces are several ids
    (`561 651 1167`, the id-only form); anything else is a name.

    Returns:
      Ids as int, names as str (stripped, non-empty).

    Raises:
      `error` starting with `where`: a stray or unclosed quote, an empty entry, no entry at all.
    """
    out: list[str | int] = []
    pos = 0
    while True:
        m = _ENTRY.match(text, pos)
        if m is None:
            raise error(f"{where}: a double quote must enclose a whole entry (column {pos + 1})")
        name = m["quoted"] if m["quoted"] is not None else m["plain"]
        if m["quoted"] is None and _IDS.fullmatch(name):
            out += [int(t) for t in name.split()]
        elif name.strip():
            out.append(name.strip())
        elif text.strip():
            raise error(f"{where}: an empty entry (column {pos + 1}); separate songs by one comma")
        if not m["end"]:
            break
        pos = m.end()
    if not out:
        raise error(f"{where}: no songs")
    return out


class SongIndex:
    """The catalog by the names people type; built once (a few seconds per 100k songs at most).

    A name matches a song if its `normalize` form equals the song's title, its "title - artist"
    (`song_key`) or its external key; if nothing matches so, the `compact` forms are compared.
    """

    def __init__(
        self, titles: Sequence[str], artists: Sequence[str], keys: Sequence[str] | None = None
    ):
        self.titles, self.artists = tuple(titles), tuple(artists)
        self._exact: dict[str, list[int]] = collections.defaultdict(list)
        self._loose: dict[str, list[int]] = collections.defaultdict(list)
        self._grams: dict[str, list[int]] = collections.defaultdict(list)
        self._keys: list[str] = []  # "title - artist" per song: what search and typos compare
        self._titles: list[str] = []  # normalized
        for i, (title, artist) in enumerate(zip(self.titles, self.artists, strict=True)):
            title, artist = normalize(title), normalize(artist)
            key = f"{title} - {artist}"  # song_key
            self._keys.append(key)
            self._titles.append(title)
            for s in {title, key, normalize(keys[i]) if keys else ""} - {""}:
                self._exact[s].append(i)
            loose = _alnum(title)
            for s in {loose, loose + _alnum(artist)} - {""}:
                self._loose[s].append(i)
            for g in _trigrams(key):
                self._grams[g].append(i)

    @property
    def size(self) -> int:
        return len(self.titles)

    def describe(self, song: int) -> str:
        """ "5794 Firework (Katy Perry)": id, title, artist, as errors list them."""
        return f"{song} {self.titles[song]} ({self.artists[song]})"

    def matches(self, name: str) -> list[int]:
        """The ids `name` matches (exactly if any, else in the compact form), ascending."""
        found = self._exact.get(normalize(name)) or self._loose.get(compact(name)) or []
        return sorted(set(found))

    def resolve(self, entry: str | int, where: str, error: type[Exception] = ConfigError) -> int:
        """One entry of `split_entries` as a catalog id.

        Raises:
          `error` starting with `where`: an id outside the catalog; a name no song has (listing
            the closest songs); a name several songs have (listing them, to choose by id).
        """
        if isinstance(entry, int):
            if entry >= self.size:
                raise error(f"{where}: song id {entry} is not in the catalog (0..{self.size - 1})")
            return entry
        found = self.matches(entry)
        if len(found) == 1:
            return found[0]
        if found:
            listed = ", ".join(map(self.describe, found[:SHOWN]))
            raise error(
                f"{where}: {entry!r} is ambiguous, {len(found)} songs match; give 'title - artist' "
                f"or an id: {listed}{', ...' if len(found) > SHOWN else ''}"
            )
        close = ", ".join(map(self.describe, self.closest(entry)))
        raise error(f"{where}: no song {entry!r} in the catalog; closest: {close or 'none'}")

    def parse_history(
        self, text: str, where: str, error: type[Exception] = ConfigError
    ) -> list[int]:
        """The catalog ids of one typed history (`split_entries`, then `resolve` each)."""
        return [self.resolve(e, where, error) for e in split_entries(text, where, error)]

    def closest(self, text: str, n: int = SHOWN) -> list[int]:
        """Up to `n` songs whose title or "title - artist" is most like `text` (difflib ratio),
        among the `FUZZY_CANDIDATES` that share the most letter trigrams with it."""
        query = normalize(text)
        shared = collections.Counter()
        for g in _trigrams(query):
            shared.update(self._grams.get(g, ()))
        # ties by id: the trigrams are a set, whose order changes with each run's hash seed
        best = heapq.nsmallest(FUZZY_CANDIDATES, shared.items(), key=lambda c: (-c[1], c[0]))
        candidates = [song for song, _ in best]

        def likeness(song: int) -> float:
            matcher = difflib.SequenceMatcher(None, query, self._titles[song])
            title = matcher.ratio()
            matcher.set_seq2(self._keys[song])
            return max(title, matcher.ratio())

        scored = sorted((-likeness(s), s) for s in candidates)
        return [s for score, s in scored[:n] if -score >= 0.5]

    def search(self, query: str, limit: int) -> list[int]:
        """Songs for an autocomplete box, best first, at most `limit`.

        Order: exact title or "title - artist"; title starts with the query; a title word does;
        the query is inside "title - artist"; then close spellings (`closest`). Within each, the
        shorter title first, then the lower id.
        """
        q = normalize(query)
        if not q:
            return []
        exact = set(self._exact.get(q, ()))
        hits = [i for i, key in enumerate(self._keys) if q in key]
        hits += [i for i in exact if q not in self._keys[i]]  # an external key

        def tier(song: int) -> tuple[int, int, int]:
            title = self._titles[song]
            rank = 3
            if song in exact:
                rank = 0
            elif title.startswith(q):
                rank = 1
            elif f" {q}" in f" {title}":
                rank = 2
            return rank, len(title), song

        found = sorted(hits, key=tier)[:limit]
        if len(found) < limit:
            seen = set(found)
            found += [s for s in self.closest(query, limit) if s not in seen][: limit - len(found)]
        return found
