"""sottovoce daemon: owns the MLX models and serves the ZeroMQ socket."""
