"""Frame memory bank and point-cloud world cache. Knows nothing of the DiT.

* :mod:`.camera`: a world's camera (poses, projection, depth units, frustum), ViZDoom's fitted;
* :mod:`.cloud`: the point-cloud world cache of a batch of sessions (fuse, bound, render, .ply);
* :mod:`.views`: cache views of training windows (each frame through its predecessors' cloud);
* :mod:`.motion`: the camera's next pose from its momentum and the actions.

docs/world_cache.md describes them.
"""
