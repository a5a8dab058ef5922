"""Models: the open_clip wrapper (`ecvl.models.clip`), its shipped tiny configs and the adapter.

Import from the submodules; this package re-exports nothing so that importing one part does
not pull in the others.
"""
