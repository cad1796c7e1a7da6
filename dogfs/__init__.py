"""DogFS: a distributed file system on Twisted.

Metadata lives on a Raft group (``dogfs.raft``, ``dogfs.meta``); data lives on chunk
servers (``dogfs.chunk``, ``dogfs.storage``) as Reed-Solomon shards (``dogfs.codec``);
clients (``dogfs.client``, ``dogfs.cli``) move the bytes themselves over the DogFS
wire protocol (``dogfs.wire``).
"""

__version__ = "0.1.0"
