"""Song names as people type them: the normal form shared by the importer and name look-up."""

from __future__ import annotations

import unicodedata


def normalize(text: str) -> str:
    """`text` folded for matching: accents removed, case folded, runs of whitespace made one space.

    "  Beyoncé   - HALO " -> "beyonce - halo". Compatibility forms are unified too (NFKD), so a
    full-width or ligature spelling matches its plain one.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(bare.casefold().split())
