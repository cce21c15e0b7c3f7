"""Reference pipelines that fastmveb's own stages are measured against (not used by training)."""
