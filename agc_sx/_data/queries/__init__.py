"""func_adl queries of agc-sx."""
