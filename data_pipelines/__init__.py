"""Episodes: embodiments and their experts, the on-disk episode format, shards and loaders.
Imported as ``gato_like.data_pipelines``.
"""
