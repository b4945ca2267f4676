"""HTTP load generator for any OpenAI-compatible server (`inferd bench serve`, `inferd bench plot`).

Layer 6: never imports torch or the engine. httpx lives in client.py alone; matplotlib in plot.py, lazily.
"""
