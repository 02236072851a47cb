"""Frame memory bank and point-cloud world cache (DESIGN.md section 7). Knows nothing of the DiT."""
