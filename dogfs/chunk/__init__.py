"""The chunk server daemon: shard RPCs, heartbeats, garbage collection.

- `dogfs.chunk.server`: `ShardServer`, the PutShard / GetShard / DeleteShards handlers over a
  `dogfs.storage.shards.ShardStore`, plus what the daemon knows of its shards.
- `dogfs.chunk.heartbeat`: `HeartbeatService`, heartbeats and shard reports to the metadata
  leader (META_PROTOCOL), and the garbage collection that follows a report.
- `dogfs.chunk.rebuild`: `ShardRebuilder`, RebuildShard: a lost shard made again from its peers'
  shards (the metadata leader's repair).
- `dogfs.chunk.load`: `LoadMeter`, traffic rates for the heartbeat's `load`.
- `dogfs.chunk.service`: `ChunkService`, the service tree twistd runs.

May import dogfs.wire, dogfs.storage, dogfs.codec and dogfs.config; never the global reactor.
"""
