"""The network side of the streaming TTS server.

`server/` holds everything that speaks to clients: the wire protocol (`protocol.py`), the
configuration tree (`config.py`), admission control (`admission.py`), the Prometheus metrics
(`metrics.py`) and the aiohttp application. Model code lives in `streaming_tts/`, which never
imports from here.

Nothing is imported eagerly, so `import server.protocol` stays cheap and does not pull in aiohttp.
"""
