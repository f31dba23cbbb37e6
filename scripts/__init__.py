"""Scripts that rebuild every committed asset and benchmark figure; run them as `python -m scripts.NAME`."""
