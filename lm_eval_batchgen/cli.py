"""``batchgen-lm-eval``: lm-eval's command line with the ``batchgen`` model registered.

lm-eval 0.4.x resolves ``--model`` against its own registry and reads no plugin entry points, so a
model defined outside its source tree has to be imported before its command line runs. This does
that and hands over: ``batchgen-lm-eval --model batchgen --model_args pretrained=...`` takes every
argument of ``lm_eval`` (``python -m lm_eval_batchgen ...`` is the same).
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import lm_eval_batchgen.model  # noqa: F401  (registers "batchgen")

    cli_evaluate()


if __name__ == "__main__":
    main()
