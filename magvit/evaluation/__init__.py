"""The evaluation behind ``python -m magvit.evaluate``: ``inputs`` (what is read), ``evaluators`` (what is
measured) and ``report`` (what is written)."""
