"""twistd dogfs-chunk: placeholder until the chunk service lands."""
