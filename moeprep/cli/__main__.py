"""`python -m moeprep.cli`: the moeprep command, as the tests and CI jobs run it."""

from moeprep.cli import main

main()
