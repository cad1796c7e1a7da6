"""twistd dropins for the DogFS daemons: nothing heavy is imported here."""

from twisted.application.service import ServiceMaker

dogfsMeta = ServiceMaker(
    "DogFS metadata node", "dogfs.plugins.meta", "A DogFS metadata node (namespace, placement, Raft).", "dogfs-meta"
)
dogfsChunk = ServiceMaker(
    "DogFS chunk server", "dogfs.plugins.chunk", "A DogFS chunk server (erasure-coded shards on disk).", "dogfs-chunk"
)
