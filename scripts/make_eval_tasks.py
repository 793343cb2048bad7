"""Regenerate the data of the shipped lm-eval tasks (maintainers only).

The items are cut deterministically from the shipped evaluation split; changing them
changes every published task number. Run:  python scripts/make_eval_tasks.py
"""

import hashlib
import json

from moekit.data.shipped import read_shipped
from moekit.eval.tasks.stdlib_nexttoken import DATA_FILE, build_items, write_items

if __name__ == "__main__":
    items = build_items(read_shipped("eval"))
    path = write_items(items, DATA_FILE)
    data = path.read_bytes()
    print(json.dumps({"file": str(path), "items": len(items), "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()}, indent=1))
