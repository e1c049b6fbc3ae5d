"""Training entry points (``train_tokenizer.py``, ``train_transformer.py``) and job submission helpers."""
