"""twistd dogfs-meta: placeholder until the metadata service lands."""
