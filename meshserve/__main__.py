"""``python -m meshserve``: the same as the ``meshserve`` command."""

from meshserve.cli.main import main

raise SystemExit(main())
