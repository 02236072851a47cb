"""Frame memory bank and point-cloud world cache. Knows nothing of the DiT."""
