"""``python -m meshserve``: the same as the ``meshserve`` command."""

from meshserve.cli import main

raise SystemExit(main())
