"""`python -m ohd` runs the command line."""

from ohd.cli.commands import main

raise SystemExit(main())
