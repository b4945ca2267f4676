"""`python -m inferd.bench serve|plot ...`: the bench tool without the rest of the CLI."""

from inferd.bench.serve import main

raise SystemExit(main())
