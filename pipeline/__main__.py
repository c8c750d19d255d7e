"""`python -m pipeline ...` is the `symzoo` command, for machines where symzoo is not pip-installed."""

from pipeline.cli import main

main()
