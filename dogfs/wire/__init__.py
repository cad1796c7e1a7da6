"""Length-prefixed binary framing and message types shared by every DogFS connection.

Depends on nothing else in DogFS.
"""
