"""Requests on an engine, independent of MLServer: generation, hidden states, embeddings."""
