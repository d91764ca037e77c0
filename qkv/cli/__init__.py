"""The `qkv` command line (see qkv.cli.main)."""
