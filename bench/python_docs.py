"""Write a second evaluation text of another kind: the Python documentation topics that ship with CPython.

    python bench/python_docs.py OUT.txt

`pydoc_data.topics` (PSF licence) holds the language reference sections that `help()` shows: technical English with
code examples, unlike WikiText's encyclopedia prose and unlike the calibration corpus (plays, essays, source code).
Built from the running interpreter rather than copied into the repo; the bench records its SHA-256, and the text
differs between Python versions.
"""
from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path

from pydoc_data.topics import topics


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/python_docs.py OUT.txt")
    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    out = Path(sys.argv[1])
    out.write_text(text, encoding="utf-8")
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    print(f"{out}: {len(topics)} topics, {len(text)} characters, Python {platform.python_version()}, sha256 {sha}")


if __name__ == "__main__":
    main()
