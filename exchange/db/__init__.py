"""Database plumbing shared by the coordinator and the node: engines, metadata, migrations."""
