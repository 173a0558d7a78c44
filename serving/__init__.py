"""Serving: the model store (signed snapshots on a filesystem or object store) and request scoring from Feast."""
