"""Head sets (retrieval / streaming KV heads) that ship with graphwright: ``<model>_<method>.json``.

Each file is a :class:`graphwright.heads.HeadSet` written by the head profiler, so ``duo`` works
on the model as written without first spending the profiling time.
"""
