"""``layerstream chunk``: a Hugging Face checkpoint -> a chunk store + a model-repository entry."""
