"""volfm.cli: the ``volfm`` command (``main``), the demo, ``volfm predict`` and ``volfm inspect``."""
