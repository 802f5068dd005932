"""The brainanomaly command line: one module per subcommand."""
