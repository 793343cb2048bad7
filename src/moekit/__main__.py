"""`python -m moekit ...` is the `moekit` command."""

from moekit.cli import main

if __name__ == "__main__":
    main()
