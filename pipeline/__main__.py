"""`python -m pipeline` is the `primaps-pipeline` command."""

from pipeline.cli import main

main()
