"""zslib: the library behind the ZeroSearch workbench notebooks."""
