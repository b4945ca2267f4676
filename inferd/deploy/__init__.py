"""Layer 6: inferd on a distributed engine (Ray Serve). `config.py` reads what a deployment needs without Ray;
`ray_serve.py` is the only module that imports ray (`pip install 'inferd[ray]'`)."""
