"""Regenerate the shipped stdlib calib/eval splits (maintainers only).

Changing them changes every published number: they were cut once and are fixed text.
Run:  python scripts/make_shipped_splits.py
"""

import json

from moekit.data.shipped import SHIPPED_DIR, write_shipped

if __name__ == "__main__":
    info = write_shipped(SHIPPED_DIR)
    summary = {k: {kk: v[kk] for kk in ("num_files", "num_chars", "sha256")} for k, v in info["splits"].items()}
    print(json.dumps({"python": info["python"], "skipped_not_utf8": info["skipped_not_utf8"], **summary}, indent=1))
