"""One model built on a meta skeleton whose blocks are streamed from a chunk store while it runs."""
