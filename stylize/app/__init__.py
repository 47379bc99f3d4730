"""Applications over the library: the command line, the terminal view, the Lambda handler."""
