"""Command-line interface: one module per subcommand, each only adapting arguments."""
