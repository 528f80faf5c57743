"""``python -m llmo``: the ``llmo`` command."""

from llmo.cli import main

raise SystemExit(main())
