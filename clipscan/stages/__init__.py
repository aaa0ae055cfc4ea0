"""Pipeline stages: read, embed, index, discrepancy, summarise, report; one module per stage."""
