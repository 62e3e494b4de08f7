"""The store stage: the spec, the memmapped store and its layout on disk, its locks, and the ``init`` and
``status`` commands. Everything downstream reads the store; the store imports no other stage."""
