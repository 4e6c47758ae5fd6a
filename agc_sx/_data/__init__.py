"""Package data: the func_adl query source, the bundled catalogue and BDT models (read via importlib.resources)."""
