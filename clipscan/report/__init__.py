"""Reports: one kit (``kit``: escaping, thumbnails, plots, tables, the page) and a thin page per job (``daf``, ``tcac``, ``bias``)."""
