"""What every layer shares: the error family (exit code 2 at the CLI) and region arithmetic."""
