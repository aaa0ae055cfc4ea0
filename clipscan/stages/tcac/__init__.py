"""TCAC, section 3.2 of "Unveiling Glitches": how the probe's caption ranking of an image moves under a harmless transform.

The stage's parts, each usable without Ray:

* ``pool``: an image's candidate captions are its own plus the ``tcac.pool_k`` nearest
  other captions of each, every distinct caption embedded once with the probe's text
  tower (``clipscan.stages.text``); whole in one process or asked of caption shards.
* ``score``: each image decoded once and turned into 1 + T versions
  (``clipscan.stages.transforms``), all versions through the image tower together,
  zero-shot probabilities over the pool, the top-k before and after, change counts,
  own-caption ranks and KL.
* ``repeats``: WebDataset ids repeated across blocks and tars, for ``collect`` to skip.
* ``collect``: ``tcac.parquet`` and ``skipped.parquet`` from the sink's pieces, one task
  per input shard, each shard's ``figures`` added up.
* ``figures``: per-transform sums, histograms and largest changes, and the caption shifts
  the LLM summary reads.

Outputs do not depend on how Ray splits the work: encoder forwards always see exactly
``tcac.forward_rows`` inputs (the last chunk padded), because CPU and GPU kernels round
differently for different batch shapes; the scores are float64 sums in a fixed order.
``clipscan.tcac.run_tcac`` runs the job.
"""
