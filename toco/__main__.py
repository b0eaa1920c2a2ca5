"""`python -m toco`: the `toco` command where its console script is not on PATH (e.g. inside a Ray job)."""
from toco.cli import main

main()
