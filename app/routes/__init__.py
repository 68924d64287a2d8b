"""One router per resource: ``jobs``, ``datasets``, ``models`` and ``health``."""
