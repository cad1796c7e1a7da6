"""The cluster CA, identities, roles and TLS context factories.

Depends on nothing else in DogFS.
"""
