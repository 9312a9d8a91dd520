"""`python -m camanim` runs the `camanim` command."""

from .cli import main

raise SystemExit(main())
