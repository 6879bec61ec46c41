"""Small subcommands that belong to no larger area."""
