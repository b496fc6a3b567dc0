"""The command layer: the only code that reads argparse. Each module turns its flags into typed
configs (``runs.TrainConfig``, ``sharding.MeshConfig``, ...) and calls the library."""
