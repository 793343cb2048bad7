"""``import moekit`` shows its public API and nothing else: no typing helpers, no modules."""

import json
import subprocess
import sys


def test_the_namespace_is_the_public_api():
    probe = ("import json, moekit\n"
             "public = [n for n in vars(moekit) if not n.startswith('_')]\n"
             "print(json.dumps([dir(moekit), public, moekit.__all__]))\n"
             "moekit.MoekitError, moekit.__version__\n"  # imports moekit.errors: Python adds it as an attribute
             "print(json.dumps(dir(moekit)))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first, after_use = done.stdout.splitlines()
    listed, public, api = json.loads(first)
    assert listed == sorted([*api, "__version__"]) == json.loads(after_use)  # modules imported since: not listed
    assert public == []  # before any use: not Any, TYPE_CHECKING, annotations, importlib
    assert {"load", "compress", "calibrate", "offload", "MoekitError"} <= set(api)
