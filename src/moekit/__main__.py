"""`python -m moekit ...` is the `moekit` command."""

from moekit.cli import entry

if __name__ == "__main__":
    entry()
