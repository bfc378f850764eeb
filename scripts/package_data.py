"""Rebuild gradleak's packaged data sets (src/gradleak/resources/*.gz) from a source folder.

    python scripts/package_data.py SOURCE_DIR [--out src/gradleak/resources]

SOURCE_DIR has the source layout: cola/dev.tsv, sst2/dev.tsv, rt-polarity/rt-polarity.pos and .neg,
wikitext-2/valid.txt (origins in src/gradleak/resources/DATA.md). Each file is copied byte for byte,
except Rotten Tomatoes, which is decoded from latin-1 and stored as UTF-8; every file is gzipped with
no name and a zero time stamp in its header, so the same sources give the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
from pathlib import Path

# packaged name -> (path in the source layout, encoding of the source file)
FILES = {
    "cola-dev.tsv.gz": ("cola/dev.tsv", "utf-8"),
    "sst2-dev.tsv.gz": ("sst2/dev.tsv", "utf-8"),
    "rt-polarity.pos.gz": ("rt-polarity/rt-polarity.pos", "latin-1"),
    "rt-polarity.neg.gz": ("rt-polarity/rt-polarity.neg", "latin-1"),
    "wikitext-2-valid.txt.gz": ("wikitext-2/valid.txt", "utf-8"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder in the source layout")
    default_out = Path(__file__).resolve().parents[1] / "src" / "gradleak" / "resources"
    parser.add_argument("--out", type=Path, default=default_out, help="where the .gz files go")
    args = parser.parse_args(argv)
    for name, (relative, encoding) in FILES.items():
        source = args.source / relative
        if not source.is_file():
            print(f"error: missing {source}", file=sys.stderr)
            return 2
        text = source.read_bytes().decode(encoding)
        data = text.encode("utf-8")
        target = args.out / name
        with open(target, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as gz:
            gz.write(data)
        lines = text.count("\n")
        digest = hashlib.sha256(data).hexdigest()[:16]
        print(
            f"{target.name}: {lines} lines, {len(data)} bytes UTF-8 (sha256 {digest}), "
            f"{target.stat().st_size} bytes gzipped"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
