"""ccied.cache: the semantic cache of intermediate features (FAISS).

A leaf package: it never imports ccied.peer nor zmq. Built by the semantic-cache issue.
"""
