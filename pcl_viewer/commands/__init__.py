"""`pcl` subcommands, one module per area; imported lazily by :mod:`pcl_viewer.cli`."""
