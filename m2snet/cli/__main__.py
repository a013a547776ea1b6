"""`python -m m2snet.cli` = the `m2snet` command."""

from m2snet.cli import main

main()
