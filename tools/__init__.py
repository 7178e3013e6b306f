"""Scripts that build what the repository ships (the demo models); not imported by the library."""
