"""How a job's stages run: in this process or on Ray (``executor``)."""
