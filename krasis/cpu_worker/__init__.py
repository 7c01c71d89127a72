"""CPU decode worker pool (planned: issue 4)."""
