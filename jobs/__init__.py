"""PyFlink job entry points and their shared wiring."""
