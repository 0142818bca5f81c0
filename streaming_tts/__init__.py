"""Streaming text-to-speech: Piper voices on a PyTorch VITS, served over WebSocket.

The package imports nothing heavy at the top level, so `import streaming_tts` stays cheap;
import the submodule you need (`streaming_tts.voices`, `streaming_tts.text.phonemes`, ...).
"""

__version__ = "0.1.0"
