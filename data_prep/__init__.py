"""Command-line steps that turn raw videos into what training reads.

``python -m data_prep.index`` (manifest), ``data_prep.sample_data`` (a small real dataset), ``data_prep.sketch``
(edge-map videos), ``data_prep.extract`` (uint8 clip shards), ``data_prep.tokenize`` (token shards).
"""
