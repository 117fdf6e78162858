"""lm-evaluation-harness over the batchgen engine: the ``batchgen`` model (``lm_eval_batchgen.model``).

Importing ``lm_eval_batchgen.model`` registers it with lm-eval's model registry; the
``batchgen-lm-eval`` command (``lm_eval_batchgen.cli``) does so, then runs lm-eval's own command line.
"""
