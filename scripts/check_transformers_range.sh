#!/usr/bin/env bash
# Test moekit at both ends of the transformers range pyproject.toml states: the lowest
# release it allows (the ">=" bound, exactly, with compressed-tensors at its own lowest) and
# the newest releases PyPI has inside the ranges.
# Each end gets a fresh virtual environment (torch's CPU wheel first, as in .ci/run), then
# the tests that touch what changes between transformers releases: the canonical view of
# all 14 families, loading and saving, every "plain transformers gives the same logits"
# test (quantized outputs included), the KV cache of --speed, offloading, compress.
#
# Run it before widening the range (edit pyproject.toml first, then run this), and after a
# transformers release. 6.4 to 8.5 minutes on 2 shared cores (2026-12-06); needs PyPI. Exit 0 when
# both ends pass.
#
#   scripts/check_transformers_range.sh            # both ends
#   scripts/check_transformers_range.sh low        # or one of them: low | high
set -euo pipefail
cd "$(dirname "$0")/.."

TESTS=(
  tests/arch tests/io tests/runtime tests/test_versions.py tests/test_plain_reload.py tests/eval/test_speed.py
  tests/recipe/test_quantize.py tests/recipe/test_decompose.py tests/recipe/test_fewer_calls.py
  "tests/test_compress.py::test_compress_writes_a_standard_checkpoint"
  "tests/test_compress.py::test_recommended_preset_on_every_family"
)

stated() {  # pyproject.toml's requirement on package $1, e.g. transformers>=5.23,<5.26
  python3 -c 'import pathlib, re, sys; print(re.findall(r"^\s*\"(" + re.escape(sys.argv[1]) + r"[<>=~!].*?)\",", pathlib.Path("pyproject.toml").read_text(), re.M)[0])' "$1"
}
lowest() {  # the >= bound of requirement $1
  local bound; bound=$(sed -n 's/.*>=\([0-9][0-9.]*\).*/\1/p' <<<"$1")
  [ -n "$bound" ] || { echo "pyproject.toml's $1 has no >= bound" >&2; exit 2; }
  echo "$bound"
}
spec=$(stated transformers)
ct=$(stated compressed-tensors)
low="transformers==$(lowest "$spec") compressed-tensors==$(lowest "$ct")"

work=$(mktemp -d "${TMPDIR:-/tmp}/moekit-transformers-range.XXXXXX")
trap 'rm -rf "$work"' EXIT
status=0
ends=("$@")
[ ${#ends[@]} -gt 0 ] || ends=(low high)
for one in "${ends[@]}"; do
  case $one in
    low) want=$low ;;
    high) want="$spec $ct" ;;
    *) echo "unknown end $one (low or high)" >&2; exit 2 ;;
  esac
  venv=$work/$one
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q torch==2.13.0
  # shellcheck disable=SC2086  # $want: one or two requirements
  "$venv/bin/python" -m pip install -q -e ".[dev]" $want
  versions=$("$venv/bin/python" -c 'from importlib.metadata import version as v
print("transformers", v("transformers") + ", compressed-tensors", v("compressed-tensors"))')
  echo "== $one end of $spec: $versions"
  if "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"; then
    echo "== $one end ($versions): passed"
  else
    echo "== $one end ($versions): FAILED"
    status=1
  fi
  rm -rf "$venv"
done
exit $status
