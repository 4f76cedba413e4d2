"""`python -m ohd` runs the command line."""

from ohd.cli import main

raise SystemExit(main())
