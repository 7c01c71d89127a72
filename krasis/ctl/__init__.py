"""krasis-ctl: the command-line interface."""
