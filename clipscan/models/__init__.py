"""Model specs in, encoders out: see ``clipscan.models.registry``."""
